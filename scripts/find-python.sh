#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter: $PYTHON if set, python3.12 on PATH,
# else pyenv's versions/3.12* (pyenv's shims are often missing from a bare PATH).
# When none is found, say what was tried and why each failed, and how to get one.
set -euo pipefail
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "not runnable"; }
if [ -n "${PYTHON:-}" ]; then
  ok "$PYTHON" || {
    echo "PYTHON=$PYTHON is not a working Python >= 3.12 ($(version "$PYTHON")): give the path of python3.12 or newer" >&2
    exit 1
  }
  echo "$PYTHON"; exit 0
fi
tried=()
for cand in python3.12 python3.13 python3.14 python3; do
  p=$(command -v "$cand" 2>/dev/null) || continue
  ok "$p" && { echo "$p"; exit 0; }
  tried+=("$p ($(version "$p"))")
done
declare -A seen=()
for root in "${PYENV_ROOT:-}" "${HOME:-}/.pyenv" /root/.pyenv /opt/pyenv; do
  [ -n "$root" ] && [ -z "${seen[$root]:-}" ] || continue
  seen[$root]=1
  parent=$(dirname "$root")
  if { ! [ -e "$root" ] && [ -d "$parent" ] && ! [ -x "$parent" ]; } \
    || { [ -e "$root" ] && ! [ -x "$root" ]; } || { [ -d "$root/versions" ] && ! [ -r "$root/versions" ]; }; then
    tried+=("$root (not readable by $(id -un): its owner can chmod o+x $parent, or install your own)")
    continue
  fi
  for p in $(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r) \
    $(ls -d "$root"/versions/3.1[3-9]*/bin/python3 2>/dev/null | sort -V); do
    ok "$p" && { echo "$p"; exit 0; }
    tried+=("$p ($(version "$p"))")
  done
done
echo "No Python >= 3.12 found${tried:+ (tried: $(IFS=';'; echo "${tried[*]}" | sed 's/;/; /g'))}:" \
  "install one (pyenv install 3.12, or your distribution's python3.12) and run again," \
  "or set PYTHON=/path/to/python3.12" >&2
exit 1
