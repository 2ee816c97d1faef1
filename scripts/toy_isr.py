#!/usr/bin/env python3
"""A toy instrument signature removal: ``(raw - overscan level - bias) * gain / flat``.

Usage: ``toy_isr.py RAW BIAS FLAT OUTPUT``. RAW is a raw file whose ``IMAGE`` extension
carries ``BIASLVL`` and ``GAIN`` cards; BIAS and FLAT are Exposure-like multi-extension
files (their ``IMAGE`` extension is used). OUTPUT gets one float32 image in electrons with
the raw image's WCS. The external program of ``pipelines/isr.yaml``: it knows nothing of
the Butler and reads plain files.
"""

from __future__ import annotations

import sys

import numpy as np
from astropy.io import fits


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: toy_isr.py RAW BIAS FLAT OUTPUT", file=sys.stderr)
        return 2
    raw_path, bias_path, flat_path, out_path = argv
    with fits.open(raw_path) as raw, fits.open(bias_path) as bias, fits.open(flat_path) as flat:
        header = raw["IMAGE"].header
        level, gain = header.get("BIASLVL"), header.get("GAIN")
        if level is None or gain is None:
            print(f"toy_isr: {raw_path}: IMAGE has no BIASLVL/GAIN cards", file=sys.stderr)
            return 1
        pixels = raw["IMAGE"].data.astype(np.float64)
        bias_image, flat_image = bias["IMAGE"].data, flat["IMAGE"].data
        if bias_image.shape != pixels.shape or flat_image.shape != pixels.shape:
            shapes = f"raw {pixels.shape}, bias {bias_image.shape}, flat {flat_image.shape}"
            print(f"toy_isr: shapes differ: {shapes}", file=sys.stderr)
            return 1
        image = (pixels - level - bias_image) * gain / flat_image
        cards = header.copy()
        for key in ("XTENSION", "PCOUNT", "GCOUNT", "EXTNAME"):
            cards.remove(key, ignore_missing=True)
        out = fits.PrimaryHDU(image.astype(np.float32), header=cards)
        out.header["BUNIT"] = "electron"
        out.header["HISTORY"] = "toy_isr.py: (raw - BIASLVL - bias) * GAIN / flat"
        out.writeto(out_path)
    print(f"toy_isr: wrote {out_path} ({image.shape[1]}x{image.shape[0]}, median {np.median(image):.1f} e-)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
