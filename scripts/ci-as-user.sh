#!/usr/bin/env bash
# Run the test suite as an ordinary user, as CI does after the root run (run this as root).
#
# It makes the machine look like a normal Debian system to that user and nothing more:
#   - a user (default butlerfs-ci, or $CI_USER) with a home directory;
#   - /dev/fuse usable by users (0666, as udev makes it; containers often leave it 0600);
#   - search (x) permission for that user on the directories above the Python interpreter,
#     with an ACL when setfacl exists (pyenv under /root is 0700);
# then clones this repository's HEAD into the user's home and runs `make test` there as the
# user, with a clean environment. The clone is removed afterwards; the user's pip cache stays
# so that the next run does not download the stack again.
set -euo pipefail
cd "$(dirname "$0")/.."
user=${CI_USER:-butlerfs-ci}
if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/ci-as-user.sh sets up a test user and must run as root" >&2
  exit 1
fi
id "$user" >/dev/null 2>&1 || useradd --create-home --shell /bin/bash "$user"
home=$(getent passwd "$user" | cut -d: -f6)
if [ -e /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  echo "Making /dev/fuse usable by users (it was $(stat -c %a /dev/fuse); Debian's udev rule gives 0666)"
  chmod 0666 /dev/fuse
fi
python=$(bash scripts/find-python.sh)
dir=$(dirname "$python")
while [ "$dir" != / ]; do
  if ! runuser -u "$user" -- test -x "$dir"; then
    if command -v setfacl >/dev/null; then
      setfacl -m "u:$user:x" "$dir"
    else
      chmod o+x "$dir"
    fi
    echo "Gave $user search permission on $dir (to run $python)"
  fi
  dir=$(dirname "$dir")
done
clone="$home/butlerfs-ci-$$"
cleanup() { rm -rf "$clone"; }
trap cleanup EXIT
git clone --quiet . "$clone"
chown -R "$user:" "$clone"
echo "Running the suite as $user ($(id -u "$user")) in $clone"
runuser -u "$user" -- env -i HOME="$home" USER="$user" LOGNAME="$user" PATH=/usr/local/bin:/usr/bin:/bin \
  LANG=C.UTF-8 CI="${CI:-true}" PYTHON="$python" PYTEST_ARGS="${PYTEST_ARGS:-}" \
  make -C "$clone" test
