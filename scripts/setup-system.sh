#!/usr/bin/env bash
# Install the Debian packages butlerfs and its tests need, only those missing.
# Each entry is "command-that-proves-it-is-there:debian-package".
set -euo pipefail
needs=(
  fusermount3:fuse3
  getfattr:attr
  bwrap:bubblewrap
  source-extractor:source-extractor
  fitsverify:fitsverify
  sethead:wcstools
  fuse-overlayfs:fuse-overlayfs
)
missing=()
for entry in "${needs[@]}"; do
  command -v "${entry%%:*}" >/dev/null 2>&1 || missing+=("${entry##*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "Missing Debian packages: ${missing[*]}. Run as root: apt-get install ${missing[*]}" >&2; exit 1
  fi
else SUDO=; fi
echo "Installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
