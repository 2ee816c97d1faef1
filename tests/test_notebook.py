"""docs/notebooks/external-code.ipynb runs from top to bottom in a fresh directory.

nbclient executes it in a kernel of this Python (the venv's ``python3`` kernel spec, which
ipykernel installs; registered into a temporary Jupyter path when missing), and fails on any
error; the notebook itself checks that the mount, ``butlerfs.run`` and ``pipetask`` find the
same sources.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require, require_fuse, require_tool

ROOT = Path(__file__).parent.parent
NOTEBOOK = ROOT / "docs" / "notebooks" / "external-code.ipynb"
FIGURES = ("detections.png", "fluxes.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _kernel_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set the kernel's environment: temporary files here, a ``python3`` kernel spec of this Python."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        prefix = tmp_path / "jupyter"
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix), "--name", "python3"],
            check=True,
            capture_output=True,
        )
        monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))


def _mounts_under(directory: Path) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [point for point in points if point.startswith(str(directory) + "/")]


@pytest.mark.timeout(900)
def test_notebook_executes_without_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    require_fuse()
    require_tool("bwrap")
    for module in ("nbclient", "nbformat", "ipykernel", "sep", "matplotlib"):
        try:
            __import__(module)
        except ImportError:
            require(False, f"the Python module {module} (pip install -e '.[test]')")
    import nbformat
    from nbclient import NotebookClient

    work = tmp_path / "work"
    work.mkdir()
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    _kernel_environment(tmp_path, monkeypatch)  # the kernel inherits this process's environment
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(work)}}
    )
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    finally:
        left = _mounts_under(tmp_path)
        for point in reversed(left):
            subprocess.run(["fusermount3", "-uz", point], check=False)
    assert not left, f"the notebook left mounts behind: {left}"
    with open(work / "catalog.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert rows and {"visit", "detector", "x", "y", "flux"} <= set(rows[0])
    assert {row["detector"] for row in rows} == {"0", "1", "2", "3"}
    for name in FIGURES:
        assert (work / name).read_bytes().startswith(PNG_SIGNATURE), name
    images = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == len(FIGURES)
