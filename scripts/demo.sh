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

VISIT=733724
RUN_OUT=u/demo/sextractor
RUNWORK=$(mktemp -d)
printf 'NUMBER\nX_IMAGE\nY_IMAGE\nFLUX_AUTO\n' > "$RUNWORK/sex.param"
step "SExtractor once per detector of visit $VISIT, catalogs stored in the Butler: butlerfs run"
echo "butlerfs run $REPO -c $COLL -i calexp=calexp -w \"instrument='LSSTCam-imSim' AND visit=$VISIT\" \\"
echo "    -o cat=cat.fits:sourceCatalog --output-run $RUN_OUT -j 2 -- \\"
echo "    source-extractor '{calexp}[1]' -CATALOG_NAME cat.fits -CATALOG_TYPE FITS_1.0 ..."
$BIN/butlerfs run "$REPO" -c "$COLL" -i calexp=calexp -w "instrument='LSSTCam-imSim' AND visit=$VISIT" \
  -o cat=cat.fits:sourceCatalog --output-run "$RUN_OUT" -j 2 --workdir "$RUNWORK/work" -- \
  source-extractor '{calexp}[1]' -CATALOG_NAME cat.fits -CATALOG_TYPE FITS_1.0 \
  -PARAMETERS_NAME "$RUNWORK/sex.param" -FILTER N -VERBOSE_TYPE QUIET
MANIFEST=$(find "$RUNWORK/work" -name manifest.json | sort | head -n 1)
echo "One workspace per data ID, e.g. $(dirname "${MANIFEST#"$RUNWORK/work/"}")/: $(ls "$(dirname "$MANIFEST")" | tr '\n' ' ')"
$BIN/python -c 'import json, sys; m = json.load(open(sys.argv[1]))
print("manifest:", {k: m[k] for k in ("status", "exit_code", "overlay", "sandbox", "wall_time", "peak_rss")})
print("argv:", " ".join(m["argv"]))' "$MANIFEST"
rm -rf "$RUNWORK"

step "The catalogs, listed back: butler query-datasets $REPO sourceCatalog --collections $RUN_OUT"
$BIN/butler query-datasets "$REPO" sourceCatalog --collections "$RUN_OUT"

step "Unmounting: butlerfs umount $MNT"
$BIN/butlerfs umount "$MNT"
trap - EXIT
echo "Done. Mount it yourself: $BIN/butlerfs mount $REPO $MNT -c $COLL"
