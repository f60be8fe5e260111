#!/usr/bin/env bash
# Quick start: install everything, then import a disk image with the real worker.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/install.sh
exec cdi demo "$@"
