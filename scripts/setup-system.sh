#!/usr/bin/env bash
# Install the Debian packages butlerfs, its tests and its benchmarks need, only those missing.
# Each entry is "proof:debian-package", the proof a command on PATH or a file glob (leading /).
# As root it installs what is missing; as anyone else it installs nothing and prints the
# administrator's command (a user's `make setup` never calls apt).
set -euo pipefail
needs=(
  fusermount3:fuse3
  getfattr:attr
  bwrap:bubblewrap
  source-extractor:source-extractor
  fitsverify:fitsverify
  sethead:wcstools
  fuse-overlayfs:fuse-overlayfs
  findmnt:util-linux
  # setfacl: CI's user run gets search permission on the interpreter's directories (scripts/ci-as-user.sh).
  setfacl:acl
  '/usr/lib/postgresql/*/bin/initdb:postgresql'
  '/usr/share/postgresql/*/extension/btree_gist.control:postgresql-contrib'
  # libfuse 2 beside libfuse 3, as on most desktops: the suite proves butlerfs still runs on 3.
  '/usr/lib/*/libfuse.so.2:libfuse2'
  # Peers for scripts/bench/bench_peers.py.
  s3fs:s3fs
  rclone:rclone
  fio:fio
  # Other FUSE filesystems walking the same tree, for scripts/bench/bench_walk_floor.py.
  squashfuse_ll:squashfuse
  mksquashfs:squashfs-tools
  bindfs:bindfs
)
have() {
  case "$1" in
    /*) compgen -G "$1" >/dev/null ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}
missing=()
for entry in "${needs[@]}"; do
  have "${entry%%:*}" || missing+=("${entry##*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "Missing Debian packages: ${missing[*]}." >&2
  echo "Ask an administrator to run: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "Installing Debian packages: ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
