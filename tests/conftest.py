"""Shared fixtures: the demo repository, real mounts, and prerequisite checks.

With ``CI=true`` a missing prerequisite (``/dev/fuse``, a Debian tool) fails the
test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BIN = Path(sys.executable).parent


def require(condition: bool, what: str) -> None:
    """Skip (or, in CI, fail) when a prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {what}")
    pytest.skip(f"prerequisite missing: {what}")


def require_tool(name: str) -> str:
    """Return the path of an executable, or skip/fail."""
    path = shutil.which(name)
    require(path is not None, f"{name} (run make setup)")
    assert path is not None
    return path


def require_fuse() -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    require_tool("fusermount3")


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """A small demo repository shared by the session (tests must not modify it)."""
    from butlerfs.demo import make_demo_repo

    root = tmp_path_factory.mktemp("demo") / "repo"
    return make_demo_repo(str(root), visits=2, detectors=3, image_size=256)


DEFAULTS = "LSSTCam-imSim/defaults"


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    """An empty directory, checked afterwards for a leftover mount."""
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    mounted = subprocess.run(["findmnt", "-n", str(path)], capture_output=True, text=True).stdout
    if mounted.strip():
        subprocess.run(["fusermount3", "-uz", str(path)], check=False)
        pytest.fail(f"test left {path} mounted")


@pytest.fixture
def mounted(demo, mountpoint: Path):
    """The demo repository mounted for one test."""
    require_fuse()
    import butlerfs

    with butlerfs.mount(demo.root, str(mountpoint), collections=[DEFAULTS], refresh=1.0) as m:
        yield m


def run_cli(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run the installed ``butlerfs`` command."""
    result = subprocess.run([str(BIN / "butlerfs"), *args], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"butlerfs {' '.join(args)} failed:\n{result.stderr}")
    return result
