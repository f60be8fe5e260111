#!/usr/bin/env bash
# Installs everything the project and its tests use: system packages, then the
# project itself with its dev extra.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-utils nbdkit nginx-light tinyproxy curl gzip xz-utils zstd bzip2 util-linux util-linux-extra docker-registry xfsprogs)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[dev]'
