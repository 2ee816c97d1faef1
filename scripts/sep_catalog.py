#!/usr/bin/env python
"""The technote's notebook flow, through a butlerfs mount instead of ``butler.get`` + ``writeFits``.

Mounts the repository, globs the calexps of one visit through the mount, runs ``sep``
(background, then sources above ``--thresh`` times the global RMS) on each image HDU, and
writes all sources to one CSV with the detector and visit of each. No file is copied out
of the repository and no afw is needed::

    .venv/bin/python scripts/sep_catalog.py demo-repo -c LSSTCam-imSim/defaults --visit 733724

``sep`` is not a dependency of butlerfs: ``pip install sep`` (wheels exist for Python 3.12).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", help="Butler repository")
    parser.add_argument("-c", "--collections", action="append", required=True, help="collections to search")
    parser.add_argument("--visit", type=int, required=True, help="visit whose calexps to extract")
    parser.add_argument("--output", default="catalog.csv", help="aggregated catalog (default: catalog.csv)")
    parser.add_argument("--limit", type=int, default=20, help="most images to process (the technote used 20)")
    parser.add_argument("--thresh", type=float, default=1.5, help="threshold in global RMS units")
    parser.add_argument("--mountpoint", default=None, help="where to mount (default: a temporary directory)")
    return parser.parse_args(argv)


def extract(path: str, thresh: float):
    """Background-subtract the image HDU of a calexp and extract its sources with sep."""
    import numpy as np
    import sep
    from astropy.io import fits

    with fits.open(path, memmap=False) as hdul:
        data = np.asarray(hdul[1].data)
    data = data.astype(data.dtype.newbyteorder("="))  # sep wants native byte order
    background = sep.Background(data)
    return sep.extract(data - background, thresh, err=background.globalrms)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import sep  # noqa: F401
    except ImportError:
        print("sep is not installed: pip install sep (in butlerfs's environment)", file=sys.stderr)
        return 2
    import butlerfs

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="butlerfs-sep-") as tmp:
        mountpoint = args.mountpoint or os.path.join(tmp, "mnt")
        os.makedirs(mountpoint, exist_ok=True)
        with butlerfs.mount(args.repo, mountpoint, args.collections, dataset_types=["calexp"]) as m:
            pattern = m.path("calexp", "instrument_*", "detector_*", f"visit_{args.visit}", "*.fits")
            files = sorted(glob.glob(pattern))[: args.limit]
            if not files:
                print(f"no calexp of visit {args.visit} in {', '.join(args.collections)}", file=sys.stderr)
                return 1
            total = 0
            with open(args.output, "w", newline="") as stream:
                writer = None
                for path in files:
                    detector = int(path.split("/detector_")[1].split("/")[0])
                    objects = extract(path, args.thresh)
                    if writer is None:
                        writer = csv.writer(stream)
                        writer.writerow(["visit", "detector", *objects.dtype.names])
                    for row in objects:
                        writer.writerow([args.visit, detector, *row.tolist()])
                    total += len(objects)
                    print(f"{os.path.basename(path)}: {len(objects)} sources")
    elapsed = time.perf_counter() - start
    print(f"{total} sources from {len(files)} images of visit {args.visit} in {args.output} ({elapsed:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
