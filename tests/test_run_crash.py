"""``butlerfs run`` crashes and full disks: nothing stranded, clear one-line errors.

Real runs of the installed command on the session's demo repository (no outputs are
declared, so it is never modified): ``kill -9`` of the run (and of its mount daemon), two
concurrent runs in one work directory, and a work directory on a tiny full tmpfs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import BIN, DEFAULTS, require_fuse, require_root, require_tool

from butlerfs.mounting import daemons_serving

pytestmark = pytest.mark.fuse

SLEEP = f"sleep 307.{os.getpid():07d}"
"""The slow program: its odd duration, unique to this session, finds strays by command line.

Unique, so that the clean-up of another session running these tests at the same time leaves
this one's programs alone."""


def mounts_under(path: Path) -> list[str]:
    """Mount points under ``path`` (any filesystem), from ``/proc/self/mountinfo``."""
    prefix = str(path).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as table:
        points = [line.split()[4].encode().decode("unicode_escape") for line in table]
    return [point for point in points if point.startswith(prefix)]


def started(work: Path) -> int:
    """How many slow programs got going (each writes a.txt first, into upper/, or merged/ for links).

    Kernel overlays live in the programs' own mount namespaces: the mount table does not show them.
    """
    written = [*work.glob("instrument_*/*/*/upper/a.txt"), *work.glob("instrument_*/*/*/merged/a.txt")]
    return len({path.parent.parent for path in written})


def poll(condition, timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_argv(demo, work: Path, *args: str) -> list[str]:
    return [str(BIN / "butlerfs"), "run", demo.root, "-c", DEFAULTS, "--workdir", str(work), *args]


def start_slow(demo, work: Path, *args: str) -> subprocess.Popen[str]:
    """Start a run of two slow programs at a time, each writing a file first."""
    program = f"echo x > a.txt; {SLEEP}"
    return subprocess.Popen(
        run_argv(demo, work, "-i", "img=calexp", "-j", "2", *args, "--shell", "--", program),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def quick(demo, work: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        run_argv(demo, work, "-i", "img=calexp", "-j", "2", "--", "test", "-s", "{img}"),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """A work directory; afterwards every process the test started is killed and every mount gone."""
    require_fuse()
    yield tmp_path / "work"
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if SLEEP in cmdline or (str(tmp_path) in cmdline and "butlerfs" in cmdline):
            with contextlib.suppress(psutil.Error):
                process.kill()
    left = mounts_under(tmp_path)
    for point in reversed(left):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
        subprocess.run(["fusermount3", "-uz", point], capture_output=True, check=False)
    assert not left, f"left mounted: {left}"


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("overlay", "kill_daemon"), [("auto", False), ("fuse", False), ("auto", True)], ids=str
)
def test_kill_9_strands_nothing_and_the_plain_rerun_carries_on(demo, work, overlay, kill_daemon):
    if overlay == "fuse":
        require_tool("fuse-overlayfs")
    before = mounts_under(work.parent)
    proc = start_slow(demo, work, "--overlay", overlay)
    try:
        poll(lambda: started(work) >= 2, 120, "two programs", proc)
        daemons = daemons_serving(str(work / ".mnt"))
        assert len(daemons) == 1, daemons
        strays = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        if kill_daemon:  # both at once: the mounts stay, the rerun must clear them
            kill_pids([proc.pid, daemons[0]])
        else:
            kill_pids([proc.pid])
        proc.wait(timeout=30)
        poll(lambda: not psutil.pid_exists(daemons[0]) or _zombie(daemons[0]), 60, "the daemon to exit")
        if not kill_daemon:
            poll(lambda: not mounts_under(work), 60, "the daemon to unmount everything")
        else:
            assert mounts_under(work), "killing the daemon too should leave mounts for the rerun to clear"
    finally:
        kill_pids([proc.pid])
        proc.communicate(timeout=30)
    rerun = quick(demo, work)
    assert rerun.returncode == 0, rerun.stderr + rerun.stdout
    assert "Traceback" not in rerun.stderr
    assert f"{demo.dataset_counts['calexp']} ok" in rerun.stdout, rerun.stdout
    if kill_daemon:
        assert "Cleared what a killed run left" in rerun.stderr, rerun.stderr
    assert mounts_under(work.parent) == before
    assert not daemons_serving(str(work / ".mnt"))
    kill_pids([pid for pid in strays if psutil.pid_exists(pid)])


def _zombie(pid: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return True


def test_second_run_in_the_same_work_directory_is_refused(demo, work):
    first = start_slow(demo, work)
    try:
        poll(lambda: started(work) >= 2, 120, "two programs", first)
        second = quick(demo, work)
        assert second.returncode != 0
        assert "Traceback" not in second.stderr, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr
        assert f"another butlerfs run (pid {first.pid}) is using work directory {work}" in lines[0]
        assert "give another --workdir" in lines[0]
        assert str(work / ".mnt") in mounts_under(work), "the refused run touched the first run's mount"
        assert len(psutil.Process(first.pid).children(recursive=True)) >= 3, "...or its programs"
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.communicate(timeout=120)
        finally:
            kill_pids([first.pid])
    assert first.returncode == 130
    assert not mounts_under(work)
    assert int((work / ".lock").read_text()) == first.pid


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    require_root(
        "mounting a small tmpfs to fill, where the test sees it too (a user's tmpfs exists only in "
        "a user namespace of its own)"
    )
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave: int = 0) -> None:
    """Write into ``directory`` until at most ``leave`` bytes are free."""
    with open(directory / "filler", "wb") as stream:
        with contextlib.suppress(OSError):
            while True:
                st = os.statvfs(directory)
                free = st.f_bavail * st.f_frsize
                if free <= leave:
                    break
                stream.write(b"\0" * min(65536, free - leave))
                stream.flush()


def test_full_work_directory_one_line_error(demo, work, tmp_path):
    with tiny_tmpfs(tmp_path / "full", "1m") as full:
        (full / "work").mkdir()
        fill(full)
        result = quick(demo, full / "work")
        assert result.returncode != 0
        assert "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, result.stderr
        assert f"the work directory {full / 'work'} ran out of space (" in lines[0], lines[0]
        assert "free some space or give another --workdir" in lines[0]
        assert not mounts_under(full)


def test_workspace_filling_up_mid_run_fails_the_data_ids_clearly(demo, work, tmp_path):
    with tiny_tmpfs(tmp_path / "small", "4m") as small:
        workdir = small / "work"
        # Room for the probe and the lock, not for a copy of each calexp.
        fill(small, leave=256 << 10)
        result = subprocess.run(
            run_argv(demo, workdir, "-i", "img=calexp:copy", "-j", "2", "--", "test", "-s", "{img}"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 1, result.stderr + result.stdout
        assert "Traceback" not in result.stderr, result.stderr
        assert "internal error" not in result.stdout + result.stderr
        assert "ran out of space" in result.stdout, result.stdout
        for path in workdir.glob("instrument_*/detector_*/visit_*/manifest.json"):
            manifest = json.loads(path.read_text())
            assert manifest["status"] == "failed"
        assert not mounts_under(small)
