"""Shared fixtures: the demo repository, real mounts, and prerequisite checks.

With ``CI=true`` a missing prerequisite (``/dev/fuse``, a Debian tool) fails the
test instead of skipping it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
BIN = Path(sys.executable).parent
# scripts/pgserver.py (a private PostgreSQL server) is shared with the benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))


def pytest_configure(config: pytest.Config) -> None:
    """Give the programs the tests start a default SIGINT, whatever this session inherited.

    A suite started in the background (``make test &``, two suites at once, a CI runner's
    job) inherits SIGINT ignored, as shells do for background jobs, and passes that on to
    every process it starts: Python then installs no KeyboardInterrupt handler, and a
    ``butlerfs run`` the tests "Ctrl-C" rightly ignores it. With a handler here, children
    start with SIGINT's default disposition, as from a terminal.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def require(condition: bool, what: str) -> None:
    """Skip (or, in CI, fail) when a prerequisite is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing in CI: {what}")
    pytest.skip(f"prerequisite missing: {what}")


def require_root(why: str) -> None:
    """Skip a test that truly needs root (also in CI: the user run skips it, the root run runs it)."""
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why} (the CI's root run covers it)")


def require_tool(name: str) -> str:
    """Return the path of an executable, or skip/fail."""
    path = shutil.which(name)
    require(path is not None, f"{name} (run make setup)")
    assert path is not None
    return path


def require_fuse() -> None:
    require(os.path.exists("/dev/fuse"), "/dev/fuse")
    require_tool("fusermount3")


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Mounts keep their listing index under $XDG_CACHE_HOME: never the user's ~/.cache in tests."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


DEFAULTS = "LSSTCam-imSim/defaults"


REGISTRIES = ("sqlite", "postgresql")
"""The registry databases the tests that touch the registry run against."""


def require_postgres() -> None:
    import glob
    import importlib.util

    require(bool(glob.glob("/usr/lib/postgresql/*/bin/postgres")), "Debian's postgresql (run make setup)")
    require(importlib.util.find_spec("psycopg") is not None, "psycopg 3: butlerfs[postgres] (make setup)")


@pytest.fixture(scope="session")
def pg_server() -> Iterator:
    """A private PostgreSQL server for the session (``scripts/pgserver.py``), removed afterwards."""
    require_postgres()
    from pgserver import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def pg_registry(pg_server) -> str:
    """URL of the session's database for PostgreSQL repositories (each in its own namespace)."""
    return pg_server.create_database("butlerfs_tests")


def make_repo(request: pytest.FixtureRequest, name: str, registry: str, **kwargs):
    """`make_demo_repo` in a new directory, its registry SQLite or in the session's PostgreSQL."""
    from butlerfs.demo import make_demo_repo

    if registry == "postgresql":
        kwargs["registry"] = request.getfixturevalue("pg_registry")
    root = request.getfixturevalue("tmp_path_factory").mktemp(f"{name}-{registry}") / "repo"
    return make_demo_repo(str(root), **kwargs)


DEMO_SHAPE = {"visits": 2, "detectors": 3, "image_size": 256}


@pytest.fixture(scope="session")
def demo(request: pytest.FixtureRequest):
    """A small demo repository shared by the session (tests must not modify it)."""
    return make_repo(request, "demo", "sqlite", **DEMO_SHAPE)


@pytest.fixture(scope="session")
def demo_pg(request: pytest.FixtureRequest):
    """The same demo repository with its registry in PostgreSQL (tests must not modify it)."""
    return make_repo(request, "demo", "postgresql", **DEMO_SHAPE)


@pytest.fixture(params=REGISTRIES)
def any_demo(request: pytest.FixtureRequest):
    """`demo` or `demo_pg`: a test that takes it runs once per registry database."""
    return request.getfixturevalue("demo" if request.param == "sqlite" else "demo_pg")


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as info:
        return [line.split()[4].encode().decode("unicode_escape") for line in info]


def _leftover_processes(base: str) -> list:
    """butlerfs daemons serving a mount under ``base``, and live descendants of this process."""
    import psutil

    me = psutil.Process()
    found = {p.pid: p for p in me.children(recursive=True)}
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "butlerfs.daemon" in cmdline and base in cmdline:
            found[proc.pid] = proc
    alive = []
    for proc in found.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            pass
    return alive


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the run if the tests left a mount under their temporary directory or a process.

    What is found is cleaned up first (mounts detached, deepest first; processes killed by
    PID), so one leak does not break the next run.
    """
    base = str(tmp_path_factory.getbasetemp())
    yield
    mounts = sorted((p for p in _mount_points() if p == base or p.startswith(base + "/")), reverse=True)
    for point in mounts:
        for argv in (["fusermount3", "-uz", point], ["umount", "-l", point]):
            if subprocess.run(argv, capture_output=True).returncode == 0:
                break
    processes = _leftover_processes(base)
    described = [f"{p.pid} ({' '.join(p.cmdline())[:120]})" for p in processes if p.is_running()]
    for proc in processes:
        try:
            proc.kill()
        except Exception:
            pass
    problems = [f"mounts: {', '.join(mounts)}"] if mounts else []
    if described:
        problems.append(f"processes: {'; '.join(described)}")
    if problems:
        pytest.fail("the tests left behind " + " and ".join(problems), pytrace=False)


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


@pytest.fixture
def mounted_any(any_demo, mountpoint: Path):
    """`any_demo` mounted for one test (the test runs once per registry database)."""
    require_fuse()
    import butlerfs

    with butlerfs.mount(any_demo.root, str(mountpoint), collections=[DEFAULTS], refresh=1.0) as m:
        yield m


def run_cli(*args: str, check: bool = False, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run the installed ``butlerfs`` command."""
    result = subprocess.run([str(BIN / "butlerfs"), *args], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"butlerfs {' '.join(args)} failed:\n{result.stderr}")
    return result
