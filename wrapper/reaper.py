"""Run one program so that nothing it starts outlives it: ``python -I -S reaper.py ...``.

The runner starts this file (standard library only, so it starts in a few milliseconds
without site-packages) for every execution::

    python -I -S reaper.py GRACE RECORD PARENT_PID [--overlay TARGET OPTIONS] -- PROGRAM ARG...

It makes itself a child subreaper (``PR_SET_CHILD_SUBREAPER``), so every process the program
starts, even one that forks twice and calls ``setsid`` to become a daemon, stays among its
descendants instead of being adopted by ``init``. It runs the program and, when the program
exits, stops whatever is left (``SIGTERM``, ``SIGKILL`` after GRACE seconds), reaps it all,
writes to RECORD what it stopped and the program's peak memory (JSON: ``{"killed": [{"pid":
..., "command": ...}], "maxrss": BYTES, "inherited": BYTES}``: ``maxrss`` from ``wait4``
counts the reaper's own resident size at the fork, ``inherited``, as a floor) and exits as
the program did (the same status, or the same signal).

With ``--overlay`` it first gives itself a mount namespace of its own and mounts a kernel
overlay there (``mount("overlay", TARGET, "overlay", 0, OPTIONS)``, relative paths resolved
from its working directory), then changes into TARGET: the program (and a sandbox it runs in)
sees the overlay, nobody else does, and the kernel unmounts it when the last process of the
namespace exits, however that happens. Without ``CAP_SYS_ADMIN`` (not root) the namespace is
also a user namespace that maps the user's own UID and GID to themselves (``-o userxattr``), so
the program runs as the user, seen from outside and inside alike; it loses the namespace's
capabilities at ``execve`` (its UID is not 0), and the reaper drops its own once mounted. When
the namespace or the overlay cannot be made, nothing runs: the reason goes to RECORD
(``"error"``) and the exit status is 125.

Signals: ``SIGTERM``, ``SIGINT`` or ``SIGHUP`` (the runner's timeout or Ctrl-C) go to every
descendant, and GRACE seconds later ``SIGKILL`` does. ``SIGUSR1`` means "kill everything now";
it is also the parent-death signal, so when the runner dies (even by ``kill -9``) the whole
tree dies with it.
"""

import ctypes
import errno
import json
import os
import resource
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
CAP_SYS_ADMIN = 21
LINUX_CAPABILITY_VERSION_3 = 0x20080522
NOT_MOUNTED = 125
"""Exit status when the overlay could not be mounted (RECORD says why)."""


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
        # A process in the middle of execve has no command line for an instant: look again
        # briefly before settling for its name (``nohup`` when it is about to become ``sleep``).
        for _ in range(20):
            with open(f"/proc/{pid}/cmdline", "rb") as stream:
                text = stream.read().replace(b"\0", b" ").strip().decode(errors="replace")
            if text:
                return text[:500]
            time.sleep(0.0005)
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


class SetupError(Exception):
    """The namespace or the overlay could not be made; the message says why and what to do."""


def may_mount() -> bool:
    """Whether this process may mount as it is (``CAP_SYS_ADMIN``: root, outside a container)."""
    try:
        with open("/proc/self/status", "rb") as stream:
            for line in stream:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


UNSHARE_WHY = {
    errno.EPERM: "user namespaces are not allowed to unprivileged users here: "
    "sysctl kernel.unprivileged_userns_clone, or an AppArmor or seccomp policy",
    errno.ENOSPC: "no user namespace may be created: sysctl user.max_user_namespaces is 0 or reached",
    errno.EUSERS: "user namespaces are nested too deeply here",
    errno.EINVAL: "this kernel has no user namespaces",
}
MOUNT_WHY = {
    errno.ENODEV: "this kernel has no overlayfs (modprobe overlay)",
    errno.EINVAL: "overlayfs refused the layers: the upper layer's filesystem may lack extended "
    "attributes, or be NFS or FUSE; the kernel log names the cause",
    errno.ELOOP: "overlayfs refused the layers: one is inside another",
}


def setup_error(libc_call: str, code: int, why: dict[int, str]) -> SetupError:
    """Return the error of a failed call: the call, ``strerror`` and the likely cause."""
    text = f"{libc_call}: {os.strerror(code)}"
    return SetupError(f"{text} ({why[code]})" if code in why else text)


def in_initial_user_namespace() -> bool:
    """Whether this process is in the initial user namespace (not in a rootless container)."""
    try:
        with open("/proc/self/uid_map") as stream:
            return stream.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return False


def enter_namespace(libc: ctypes.CDLL) -> bool:
    """Move into a new private mount namespace; return whether overlays need ``userxattr``.

    Without ``CAP_SYS_ADMIN`` the mount namespace needs a user namespace of its own, which
    maps the effective UID and GID to themselves only (an unprivileged process may map just
    those), after ``setgroups`` is denied, as the kernel requires for the GID map. Outside
    the initial user namespace ``trusted.*`` attributes cannot be written: overlayfs then
    keeps its own in ``user.*`` ones.
    """
    user = not may_mount()
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(CLONE_NEWNS | (CLONE_NEWUSER if user else 0)) != 0:
        code = ctypes.get_errno()
        call = "unshare(CLONE_NEWUSER|CLONE_NEWNS)" if user else "unshare(CLONE_NEWNS)"
        raise setup_error(call, code, UNSHARE_WHY if user else {})
    if user:
        maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
        for name, text in maps:
            try:
                with open(f"/proc/self/{name}", "w") as stream:
                    stream.write(text)
            except OSError as err:
                raise SetupError(f"writing /proc/self/{name}: {err.strerror}") from None
    # Mounts made here must not propagate back into the namespace the runner sees.
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise setup_error("mount(MS_REC|MS_PRIVATE)", ctypes.get_errno(), {})
    return user or not in_initial_user_namespace()


def mount_overlay(libc: ctypes.CDLL, target: str, options: str, userxattr: bool) -> None:
    """Mount the kernel overlay on ``target``."""
    if userxattr:
        options += ",userxattr"
    if len(options.encode()) >= os.sysconf("SC_PAGE_SIZE"):
        raise SetupError(f"too many layers for one overlay ({len(options)} bytes of mount options)")
    if libc.mount(b"overlay", target.encode(), b"overlay", 0, options.encode()) != 0:
        code = ctypes.get_errno()
        why = dict(MOUNT_WHY)
        if userxattr:
            why[errno.EPERM] = "this kernel does not allow overlayfs in a user namespace (Linux >= 5.11 does)"
        raise setup_error("mount -t overlay", code, why)


def drop_capabilities(libc: ctypes.CDLL) -> None:
    """Give up the capabilities the new user namespace granted (none is needed any more)."""
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.capset(header, data) != 0:
        raise setup_error("capset", ctypes.get_errno(), {})


def private_overlay(libc: ctypes.CDLL, target: str, options: str) -> None:
    """Mount the overlay in a namespace of this process's own, then change into it."""
    privileged = may_mount()
    mount_overlay(libc, target, options, enter_namespace(libc))
    if not privileged:
        drop_capabilities(libc)
    os.chdir(target)


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


def write_record(record: str, content: dict[str, object]) -> None:
    """Write the JSON RECORD for the runner (a failure loses only the record)."""
    try:
        with open(record, "w") as stream:
            json.dump(content, stream)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    """Run the program of ``argv``; return (or die with) its status."""
    grace, record, parent = float(argv[1]), argv[2], int(argv[3])
    overlay = argv[5:7] if argv[4] == "--overlay" else None
    program = argv[argv.index("--", 4) + 1 :]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
    reaper = Reaper(grace)
    signal.signal(signal.SIGUSR1, reaper.kill)
    signal.signal(signal.SIGALRM, reaper.kill)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: reaper.terminate())
    if overlay is not None:
        try:
            private_overlay(libc, *overlay)
        except (SetupError, OSError) as err:
            write_record(record, {"killed": [], "maxrss": 0, "inherited": 0, "error": str(err)})
            os.write(2, f"butlerfs: cannot mount the overlay: {err}\n".encode())
            return NOT_MOUNTED
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)  # kept by unshare; set again to be sure
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
    killed = [{"pid": p, "command": c} for p, c in sorted(reaper.stopped.items())]
    write_record(record, {"killed": killed, "maxrss": reaper.maxrss, "inherited": inherited})
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
