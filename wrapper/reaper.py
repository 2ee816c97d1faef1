"""Run one program so that nothing it starts outlives it: ``python -I -S reaper.py ...``.

The runner starts this file (standard library only, so it starts in a few milliseconds
without site-packages) for every execution::

    python -I -S reaper.py GRACE RECORD PARENT_PID -- PROGRAM ARG...

It makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``), so every process the program
starts, even one that forks twice and calls ``setsid`` to become a daemon, stays among its
descendants instead of being adopted by ``init``. It runs the program and, when the program
exits, stops whatever is left (``SIGTERM``, ``SIGKILL`` after GRACE seconds), reaps it all,
writes to RECORD what it stopped and the program's peak memory (JSON: ``{"killed": [{"pid":
..., "command": ...}], "maxrss": BYTES, "inherited": BYTES}``: ``maxrss`` from ``wait4``
counts the reaper's own resident size at the fork, ``inherited``, as a floor) and exits as
the program did (the same status, or the same signal).

Signals: ``SIGTERM``, ``SIGINT`` or ``SIGHUP`` (the runner's timeout or Ctrl-C) go to every
descendant, and GRACE seconds later ``SIGKILL`` does. ``SIGUSR1`` means "kill everything now";
it is also the parent-death signal, so when the runner dies (even by ``kill -9``) the whole
tree dies with it.
"""

import ctypes
import json
import os
import resource
import signal
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def descendants(root: int) -> list[int]:
    """Return the PIDs of every live descendant of ``root``, read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stream:
                fields = stream.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            out.append(pid)
            todo.append(pid)
    return out


def command(pid: int) -> str:
    """Return a process's command line, or its name, for the record."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as stream:
            text = stream.read().replace(b"\0", b" ").strip().decode(errors="replace")
        if text:
            return text[:500]
        with open(f"/proc/{pid}/comm", "rb") as stream:
            return stream.read().strip().decode(errors="replace")
    except OSError:
        return "?"


def resident_size() -> int:
    """Return the resident size of this process in bytes (``VmRSS``), 0 if unknown."""
    try:
        with open("/proc/self/status", "rb") as stream:
            for line in stream:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Reaper:
    """The state of one execution: the program, what was stopped, and the kill deadline."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.me = os.getpid()
        self.main = 0
        self.stopped: dict[int, str] = {}
        self.maxrss = 0
        """Peak resident size of the program and the descendants it waited for (``wait4``)."""

    def signal_all(self, sig: int, record: bool = False) -> None:
        """Send ``sig`` to every live descendant; with ``record``, note those still running."""
        for pid in descendants(self.me):
            if record and pid != self.main and pid not in self.stopped:
                self.stopped[pid] = command(pid)
            try:
                os.kill(pid, sig)
                if sig == signal.SIGTERM:
                    os.kill(pid, signal.SIGCONT)  # a stopped process must run to see SIGTERM
            except OSError:
                pass

    def terminate(self, record: bool = False) -> None:
        """``SIGTERM`` to every descendant, ``SIGKILL`` after the grace period (``SIGALRM``)."""
        self.signal_all(signal.SIGTERM, record)
        if signal.getitimer(signal.ITIMER_REAL)[0] == 0:
            signal.setitimer(signal.ITIMER_REAL, max(self.grace, 0.01))

    def kill(self, *_: object) -> None:
        """``SIGKILL`` to every descendant (a signal handler)."""
        self.signal_all(signal.SIGKILL, record=True)

    def reap_all(self) -> int | None:
        """Reap children until none is left; return the program's wait status."""
        status = None
        while True:
            try:
                pid, wait_status, usage = os.wait4(-1, 0)
            except ChildProcessError:
                return status
            if pid == self.main:
                status = wait_status
                self.maxrss = usage.ru_maxrss * 1024
                # The program is gone: what it left behind is stopped now, and recorded.
                self.terminate(record=True)


def main(argv: list[str]) -> int:
    """Run the program of ``argv``; return (or die with) its status."""
    grace, record, parent = float(argv[1]), argv[2], int(argv[3])
    program = argv[5:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
    reaper = Reaper(grace)
    signal.signal(signal.SIGUSR1, reaper.kill)
    signal.signal(signal.SIGALRM, reaper.kill)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: reaper.terminate())
    if os.getppid() != parent:  # the runner died before the parent-death signal was set
        return 128 + signal.SIGKILL
    inherited = resident_size()  # a forked child starts with this high-water mark
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    pid = os.fork()
    if pid == 0:
        for sig in (signal.SIGUSR1, signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        try:
            os.execv(program[0], program)
        except OSError as err:
            os.write(2, f"butlerfs: cannot execute {program[0]}: {err.strerror}\n".encode())
        os._exit(127)
    reaper.main = pid
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    status = reaper.reap_all()
    signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        with open(record, "w") as stream:
            killed = [{"pid": p, "command": c} for p, c in sorted(reaper.stopped.items())]
            json.dump({"killed": killed, "maxrss": reaper.maxrss, "inherited": inherited}, stream)
    except OSError:
        pass
    if status is None:
        return 127
    if os.WIFSIGNALED(status):
        dead_by = os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        for handled in (signal.SIGUSR1, signal.SIGALRM, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(handled, signal.SIG_IGN)
        signal.signal(dead_by, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {dead_by})
        os.kill(os.getpid(), dead_by)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
