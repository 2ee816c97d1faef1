#!/usr/bin/env python
"""Execute docs/notebooks/external-code.ipynb in a fresh directory and keep what it shows.

The executed notebook (outputs and plots included) replaces the committed one, and its figures
(``detections.png``, ``fluxes.png``) are copied next to it, where README.md and docs/RUN.md show
them. Run it after changing the notebook::

    .venv/bin/python scripts/render_notebook.py

``tests/test_notebook.py`` executes the same notebook in CI and fails on any error.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "docs" / "notebooks" / "external-code.ipynb"
FIGURES = ("detections.png", "fluxes.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebook", type=Path, default=NOTEBOOK)
    args = parser.parse_args(argv)
    notebook = nbformat.read(args.notebook, as_version=4)
    with tempfile.TemporaryDirectory(prefix="butlerfs-notebook-") as work:
        NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": work}}
        ).execute()
        for name in FIGURES:
            shutil.copyfile(Path(work, name), args.notebook.parent / name)
    nbformat.write(notebook, args.notebook)
    print(f"Executed {args.notebook} and wrote {', '.join(FIGURES)} beside it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
