#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter: $PYTHON if set, python3.12 on PATH,
# else pyenv's versions/3.12* (pyenv's shims are often missing from a bare PATH).
set -euo pipefail
ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; }
if [ -n "${PYTHON:-}" ]; then
  ok "$PYTHON" || { echo "PYTHON=$PYTHON is not a working Python >= 3.12" >&2; exit 1; }
  echo "$PYTHON"; exit 0
fi
for cand in python3.12 python3.13 python3; do
  p=$(command -v "$cand" 2>/dev/null) || continue
  ok "$p" && { echo "$p"; exit 0; }
done
for root in "${PYENV_ROOT:-}" "$HOME/.pyenv" /root/.pyenv /opt/pyenv; do
  [ -n "$root" ] || continue
  for p in $(ls -d "$root"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do
    ok "$p" && { echo "$p"; exit 0; }
  done
done
echo "No Python >= 3.12 found: install python3.12 or set PYTHON=/path/to/python3.12" >&2
exit 1
