"""Run one program: console to files, timeout and cancellation of the whole tree, resources used.

The program runs under `wrapper.reaper` (a child subreaper: every process the program starts,
even a daemon that forked twice and left its session, stays its descendant) in a new session,
so a terminal's Ctrl-C reaches the runner only; the runner decides when children stop.
Stopping means ``SIGTERM`` to the reaper, which passes it to every descendant and sends
``SIGKILL`` after the grace period. When the program exits, the reaper stops whatever it left
running the same way and records it (`ExecResult.killed`); when the runner dies, even by
``kill -9``, the parent-death signal makes the reaper kill the whole tree.

With ``overlay`` the reaper first mounts a kernel overlay on the working directory in a mount
namespace of its own (a user namespace too when not root): only the program sees it, and it
vanishes with the program's last process, so there is nothing to unmount and nothing a crash
could strand.

Peak memory is the largest sum of the resident set sizes of the process and its descendants,
sampled with `psutil` every 10 ms for the first 0.2 s, then every ``poll_interval``; at least
the largest peak (``VmHWM``) any one of them reached, which catches spikes between samples.
(``ru_maxrss`` is no help: a child forked from a large Python process inherits its high-water
mark.) CPU time is the user and system time of the process and the descendants it waited
for, from ``wait4``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

__all__ = ["ExecResult", "OverlayError", "execute", "read_tail"]

_LOG = logging.getLogger(__name__)

REAPER = str(Path(__file__).with_name("reaper.py"))
"""The child subreaper every program runs under (standard library only)."""

_NOT_MOUNTED = 125
"""The reaper's exit status when it could not mount the overlay."""


class OverlayError(OSError):
    """An overlay that could not be mounted or unmounted."""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """What one execution did.

    Attributes
    ----------
    argv : `list` [`str`]
        The exact argument vector executed.
    exit_code : `int` or `None`
        Exit status; `None` when the process was killed by a signal.
    signal : `int` or `None`
        The signal that killed the process, if any.
    timed_out : `bool`
        Stopped because the timeout expired.
    interrupted : `bool`
        Stopped because the run was cancelled (Ctrl-C).
    wall_time : `float`
        Seconds from start to exit.
    cpu_user, cpu_system : `float`
        CPU seconds of the process and the descendants it waited for.
    peak_rss : `int`
        Peak resident memory of the whole process tree, in bytes.
    pid : `int`
        Process ID of the reaper running the program.
    killed : `list` [`dict`]
        Processes the program left running when it exited, stopped by the reaper
        (``{"pid": ..., "command": ...}``).
    """

    argv: list[str]
    exit_code: int | None
    signal: int | None
    timed_out: bool
    interrupted: bool
    wall_time: float
    cpu_user: float
    cpu_system: float
    peak_rss: int
    pid: int
    killed: list[dict[str, object]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Exited by itself with status 0."""
        return self.exit_code == 0 and not self.timed_out and not self.interrupted


class _Tree:
    """The processes of one execution: the root and every descendant seen."""

    def __init__(self, pid: int, count_root: bool = True) -> None:
        self.pid = pid
        self.count_root = count_root
        self.known: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            self.known[pid] = psutil.Process(pid)

    def sample_rss(self) -> int:
        """Record the current descendants; return the tree's resident memory, or more.

        Returns
        -------
        rss : `int`
            The larger of the sum of the current resident sizes and the largest peak
            resident size (``VmHWM``) of one process, in bytes.
        """
        root = self.known.get(self.pid)
        if root is None:
            return 0
        try:
            members = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        if not self.count_root:  # the reaper's own memory is not the program's
            members = members[1:]
        total = largest = 0
        for proc in members:
            self.known.setdefault(proc.pid, proc)
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
            largest = max(largest, _high_water_mark(proc.pid))
        return max(total, largest)

    def alive(self) -> list[psutil.Process]:
        """Known processes still running (a zombie counts as gone)."""
        out = []
        for proc in self.known.values():
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(proc)
        return out

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process group and every known live process."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)
        self.sample_rss()
        for proc in self.alive():
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)


def _high_water_mark(pid: int) -> int:
    """Return a process's peak resident size (``VmHWM``) in bytes, 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status", "rb") as stream:
            for line in stream:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _wait(poller: select.poll, timeout: float) -> None:
    """Sleep up to ``timeout`` seconds, waking at once if the process (its pidfd) exits."""
    with contextlib.suppress(InterruptedError):
        poller.poll(max(timeout, 0.0) * 1000)


def execute(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str],
    stdout: str | os.PathLike[str],
    stderr: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
    kill_grace: float = 5.0,
    poll_interval: float = 0.1,
    overlay: str | None = None,
) -> ExecResult:
    """Run ``argv`` to completion, timeout or cancellation.

    Parameters
    ----------
    argv : `~collections.abc.Sequence` [`str`]
        Program and arguments; the program is looked up on ``PATH`` if it has no ``/``.
    cwd : path-like
        Working directory.
    stdout, stderr : path-like
        Files receiving the console output (created or truncated).
    env : `~collections.abc.Mapping` [`str`, `str`], optional
        Environment; default the runner's.
    timeout : `float`, optional
        Seconds after which the tree is stopped (``SIGTERM``, then ``SIGKILL``).
    cancel : `threading.Event`, optional
        When set, the tree is stopped the same way.
    kill_grace : `float`, optional
        Seconds between ``SIGTERM`` and ``SIGKILL``.
    poll_interval : `float`, optional
        Seconds between samples of the tree's memory.
    overlay : `str`, optional
        Options of a kernel overlay to mount on ``cwd`` first, in the program's own mount
        namespace (``lowerdir=...,upperdir=...,workdir=...``; relative paths are relative to
        the parent of ``cwd``).

    Returns
    -------
    result : `ExecResult`
        Exit status, times and peak memory.

    Raises
    ------
    OSError
        Raised if the program cannot be started (not found, not executable).
    OverlayError
        Raised if the overlay could not be mounted (nothing ran).
    """
    argv = list(argv)
    _check_executable(argv[0])
    fd, record = tempfile.mkstemp(prefix="butlerfs-reaped-", suffix=".json")
    os.close(fd)
    mount = []
    if overlay is not None:
        cwd = Path(cwd).absolute()
        mount = ["--overlay", cwd.name, overlay]
        cwd = cwd.parent
    start = time.monotonic()
    try:
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", REAPER, str(kill_grace), record, str(os.getpid()), *mount, "--"]
                + argv,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=None if env is None else dict(env),
                start_new_session=True,
            )
        result = _supervise(proc, argv, start, timeout, cancel, kill_grace, poll_interval)
        killed, maxrss, inherited, problem = _read_record(record, argv[0])
        if problem and result.exit_code == _NOT_MOUNTED:
            raise OverlayError(f"kernel overlay: {problem}")
        # wait4's peak counts what the fork inherited from the reaper (its size then, plus what it
        # touched until the exec): only a clearly larger one is the program's own, and it
        # catches programs too short for the samples.
        peak = max(result.peak_rss, maxrss) if maxrss > inherited + (1 << 20) else result.peak_rss
        return dataclasses.replace(result, killed=killed, peak_rss=peak)
    finally:
        with contextlib.suppress(OSError):
            os.remove(record)


def _check_executable(program: str) -> None:
    """Raise what ``execve`` would, before the reaper starts (its failure would be an exit 127)."""
    path = program if "/" in program else None
    if path is None:
        import shutil

        path = shutil.which(program)
        if path is None:
            raise FileNotFoundError(f"program not found: {program} (not on PATH)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"program not found: {program}")
    if not os.access(path, os.X_OK):
        raise PermissionError(f"program is not executable: {program}")


def _read_record(record: str, program: str) -> tuple[list[dict[str, object]], int, int, str]:
    """Return what the reaper stopped, its ``wait4`` peak, its own size, and why it did not mount."""
    try:
        with open(record) as stream:
            data = json.load(stream)
        killed, maxrss, inherited = list(data["killed"]), int(data["maxrss"]), int(data["inherited"])
        problem = str(data.get("error", ""))
    except (OSError, ValueError, KeyError, TypeError):
        return [], 0, 0, ""
    if killed:
        _LOG.warning(
            "%s left %d process(es) running when it exited; stopped: %s",
            program,
            len(killed),
            ", ".join(f"{k['pid']} ({k['command']})" for k in killed[:5]),
        )
    return killed, maxrss, inherited, problem


def _supervise(
    proc: subprocess.Popen[bytes],
    argv: list[str],
    start: float,
    timeout: float | None,
    cancel: threading.Event | None,
    kill_grace: float,
    poll_interval: float,
) -> ExecResult:
    tree = _Tree(proc.pid, count_root=False)
    pidfd = os.pidfd_open(proc.pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    peak = 0
    timed_out = interrupted = False
    term_sent_at: float | None = None
    try:
        while True:
            waited, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if waited:
                break
            peak = max(peak, tree.sample_rss())
            now = time.monotonic()
            if term_sent_at is None:
                if timeout is not None and now - start > timeout:
                    timed_out = True
                elif cancel is not None and cancel.is_set():
                    interrupted = True
                if timed_out or interrupted:
                    _LOG.info(
                        "Stopping %s (pid %d): %s", argv[0], proc.pid, "timeout" if timed_out else "cancel"
                    )
                    tree.signal(signal.SIGTERM)
                    term_sent_at = now
            elif now - term_sent_at > kill_grace + 2.0:
                # The reaper should have killed everything by now: make sure, the hard way.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGUSR1)
                tree.signal(signal.SIGKILL)
                term_sent_at = float("inf")  # killed: just wait for the exit now
            deadline = poll_interval if now - start > 0.2 else min(poll_interval, 0.01)
            if timeout is not None and term_sent_at is None:
                deadline = min(deadline, start + timeout - now)
            _wait(poller, deadline if cancel is None else min(deadline, 0.1))
    finally:
        os.close(pidfd)
    wall = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    leftovers = tree.alive()
    settle = time.monotonic() + 0.5  # a sandbox's init may still be exiting
    while leftovers and time.monotonic() < settle:
        time.sleep(0.01)
        leftovers = tree.alive()
    if leftovers:
        _LOG.warning("%s left %d process(es) running after it exited; stopping them", argv[0], len(leftovers))
        _stop(tree, kill_grace)
    code = os.waitstatus_to_exitcode(status)
    return ExecResult(
        argv=argv,
        exit_code=code if code >= 0 else None,
        signal=-code if code < 0 else None,
        timed_out=timed_out,
        interrupted=interrupted,
        wall_time=wall,
        cpu_user=rusage.ru_utime,
        cpu_system=rusage.ru_stime,
        peak_rss=peak,
        pid=proc.pid,
    )


def _stop(tree: _Tree, grace: float) -> None:
    tree.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while tree.alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if tree.alive():
        tree.signal(signal.SIGKILL)


def read_tail(path: str | os.PathLike[str], limit: int = 2000) -> str:
    """Return the last ``limit`` bytes of a console file, decoded leniently."""
    try:
        with open(path, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            stream.seek(max(0, size - limit))
            return stream.read().decode(errors="replace")
    except OSError:
        return ""
