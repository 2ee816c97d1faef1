"""The bubblewrap sandbox: what the program may see and write.

Inside the sandbox the whole system is a read-only bind of ``/``, with a private ``/dev``,
``/proc`` and ``/tmp``; the program runs as PID 1 of its own PID namespace (whatever it
starts dies with it) and dies with the runner.
Only its working directory (the writable overlay) is writable. Paths the program must read
that the private ``/tmp`` would hide (its workspace, the butlerfs mount, inputs at rest, the
program itself, absolute paths on its command line) are bound again, read-only. So a program
cannot write into the repository even when it is given a path there, and with
``network=False`` it has no network either.
"""

from __future__ import annotations

import enum
import functools
import logging
import shutil
import subprocess
from collections.abc import Sequence

from butlerfs.errors import UsageError

__all__ = ["SandboxMode", "bwrap_argv", "bwrap_works", "resolve_sandbox"]

_LOG = logging.getLogger(__name__)

# /tmp stays visible (read-only, like the rest of the system): a program or its
# interpreter may live there (a virtual environment in a clone under /tmp). Well-behaved
# programs write temporary files where TMPDIR points, a private directory of the workspace.
_BASE = ("--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc")
# --as-pid-1: the program itself is PID 1 of its namespace, a direct child of bwrap's monitor,
# which reaps it, so wait4() on bwrap reports the program's CPU time. With bwrap's own reaper
# as PID 1 the monitor exits without reaping it and the CPU time is lost. When PID 1 exits the
# kernel kills whatever else runs in the namespace, and --die-with-parent kills the namespace
# when bwrap dies (SIGTERM or SIGKILL from a timeout or Ctrl-C).
_ISOLATION = ("--unshare-pid", "--as-pid-1", "--die-with-parent")


class SandboxMode(enum.StrEnum):
    """The user's choice: ``auto`` uses bubblewrap when it works here."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


@functools.cache
def bwrap_works() -> str | None:
    """Probe bubblewrap once.

    Returns
    -------
    problem : `str` or `None`
        `None` if a sandboxed ``true`` runs; else why not.
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        result = subprocess.run(
            [bwrap, *_BASE, *_ISOLATION, "--unshare-net", "true"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bwrap failed to start: {err}"
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return f"bwrap cannot create its namespaces here: {lines[-1] if lines else result.returncode}"
    return None


def resolve_sandbox(mode: SandboxMode | str, network: bool = True) -> bool:
    """Decide whether to sandbox, once, before anything runs.

    Parameters
    ----------
    mode : `SandboxMode` or `str`
        ``auto``, ``on`` or ``off``.
    network : `bool`, optional
        `False` asks for no network, which needs the sandbox.

    Returns
    -------
    sandboxed : `bool`
        Whether programs run under bubblewrap.

    Raises
    ------
    UsageError
        Raised when the sandbox is required (``on``, or no network) and does not work.
    """
    mode = SandboxMode(mode)
    if mode is SandboxMode.OFF:
        if not network:
            raise UsageError("--no-network needs the sandbox: drop --sandbox off")
        return False
    problem = bwrap_works()
    if problem is None:
        return True
    if mode is SandboxMode.ON or not network:
        why = "--sandbox on" if mode is SandboxMode.ON else "--no-network"
        raise UsageError(f"{why} needs bubblewrap, but {problem} (Debian: apt-get install bubblewrap)")
    _LOG.warning("Running without a sandbox: %s", problem)
    return False


def bwrap_argv(
    argv: Sequence[str],
    *,
    cwd: str,
    writable: Sequence[str],
    tmpdir: str | None = None,
    network: bool = True,
) -> list[str]:
    """Return the command line running ``argv`` inside the sandbox.

    Parameters
    ----------
    argv : `~collections.abc.Sequence` [`str`]
        The program (an absolute path) and its arguments.
    cwd : `str`
        Working directory of the program.
    writable : `~collections.abc.Sequence` [`str`]
        Directories bound read-write (the overlay), after the read-only ones.
    tmpdir : `str`, optional
        A private directory bound read-write and given to the program as ``TMPDIR``.
    network : `bool`, optional
        `False` gives the program its own empty network namespace.

    Returns
    -------
    argv : `list` [`str`]
        ``bwrap ... -- argv``.
    """
    bwrap = shutil.which("bwrap") or "bwrap"
    out = [bwrap, *_BASE]
    for path in writable:
        out += ["--bind", path, path]
    if tmpdir is not None:
        out += ["--bind", tmpdir, tmpdir, "--setenv", "TMPDIR", tmpdir]
    out += [*_ISOLATION, "--chdir", cwd]
    if not network:
        out.append("--unshare-net")
    return [*out, "--", *argv]
