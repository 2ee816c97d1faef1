#!/usr/bin/env bash
# `make demo`: build the demo repository, mount it, show what a user sees, unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
REPO=${DEMO_REPO:-demo-repo}
MNT=${DEMO_MNT:-demo-mnt}
COLL=LSSTCam-imSim/defaults

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Building a demo Butler repository in $REPO/ (DP0.2-like: LSSTCam-imSim calexps, raws, calibs)"
$BIN/butlerfs demo-repo "$REPO" --force
$BIN/butler query-collections "$REPO"

mkdir -p "$MNT"
cleanup() { mountpoint -q "$MNT" && $BIN/butlerfs umount "$MNT" || true; }
trap cleanup EXIT

step "Mounting: butlerfs mount $REPO $MNT -c $COLL"
$BIN/butlerfs mount "$REPO" "$MNT" -c "$COLL"

step "The tree (dataset type / one directory per dimension / file)"
find "$MNT/calexp" "$MNT/bias" | head -n 20
echo "..."
echo "$(find "$MNT" -type f | wc -l) files in all; top level: $(ls "$MNT" | tr '\n' ' ')"

CALEXP=$(find "$MNT/calexp" -name '*.fits' | sort | head -n 1)
step "Butler metadata as extended attributes: getfattr -d $CALEXP"
getfattr -d "$CALEXP" 2>/dev/null

step "A FITS header read through the mount by a real tool: fitsheader '$CALEXP' -e 1"
$BIN/fitsheader "$CALEXP" -e 1 | grep -E 'EXTNAME|NAXIS|CTYPE|CRVAL|BUNIT' || true
step "fitsverify on the mounted path"
fitsverify -q "$CALEXP"

step "Source extraction through the mount: source-extractor '$CALEXP[1]'"
WORK=$(mktemp -d)
printf 'NUMBER\nX_IMAGE\nY_IMAGE\nFLUX_AUTO\n' > "$WORK/sex.param"
(cd "$WORK" && source-extractor "$OLDPWD/$CALEXP[1]" -CATALOG_NAME cat.txt -CATALOG_TYPE ASCII \
   -PARAMETERS_NAME sex.param -FILTER N -VERBOSE_TYPE QUIET)
echo "$(grep -vc '^#' "$WORK/cat.txt") sources found in $(basename "$CALEXP")"
rm -rf "$WORK"

step "Unmounting: butlerfs umount $MNT"
$BIN/butlerfs umount "$MNT"
trap - EXIT
echo "Done. Mount it yourself: $BIN/butlerfs mount $REPO $MNT -c $COLL"
