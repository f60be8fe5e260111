#!/usr/bin/env bash
# The test command: linters, type checks, layer contracts, then the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
ruff check cdi importer uploadproxy tests bench
mypy
lint-imports
python3 -m pytest -q "$@"
