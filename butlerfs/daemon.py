"""Entry point of the background mount process: ``python -m butlerfs.daemon OPTIONS_JSON``.

Reports ``ok`` or ``error <message>`` once on the pipe named by ``BUTLERFS_READY_FD``.

With ``watch_pid`` (``butlerfs run``'s mount) a thread waits on a pidfd of that process: when
it dies, even by ``kill -9``, the daemon unmounts what the run left under ``cleanup_under``
(overlays use this mount as a lower layer, so they go first), then its own mount, and exits.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading

from .errors import UsageError
from .mounting import READY_FD_ENV, MountOptions, mounts_under, serve, unmount_all, unmount_under

_LOG = logging.getLogger("butlerfs.daemon")


class _Reporter:
    """Writes the one status line; later calls do nothing (the fd may be reused)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._lock = threading.Lock()

    def send(self, line: str) -> bool:
        """Write the line; return whether the parent got it (false: it is gone, or already told)."""
        with self._lock:
            if self._fd is None:
                return False
            try:
                os.write(self._fd, line.replace("\n", " ").encode() + b"\n")
                return True
            except BrokenPipeError:
                return False
            finally:
                os.close(self._fd)
                self._fd = None


def _mounted(options: MountOptions, reporter: _Reporter) -> None:
    """Tell the parent the mount is ready; if it is gone, nobody knows of the mount: undo it.

    A ``butlerfs mount`` killed (Ctrl-C, a timeout) while this daemon was starting must not
    leave a mount appearing after it died, with no PID file to find its daemon by.
    """
    if reporter.send("ok"):
        return
    _LOG.warning("The process that started this mount is gone: unmounting %s", options.mountpoint)
    own = os.path.realpath(options.mountpoint)
    unmount_all([m for m in mounts_under(os.path.dirname(own)) if m[0] == own])


def _clean_up_and_exit(options: MountOptions) -> None:
    """Unmount what the dead parent left, then this daemon's own mount, and exit at once."""
    _LOG.warning("Process %d is gone: unmounting and exiting", options.watch_pid)
    status = 0
    try:
        if options.cleanup_under:
            cleared = unmount_under(options.cleanup_under, keep=[options.mountpoint])
            if cleared:
                _LOG.warning("Unmounted %d mount(s) under %s", len(cleared), options.cleanup_under)
        own = os.path.realpath(options.mountpoint)
        unmount_all([m for m in mounts_under(os.path.dirname(own)) if m[0] == own])
    except Exception:
        _LOG.exception("Cleaning up after process %d failed", options.watch_pid)
        status = 1
    for handler in logging.getLogger().handlers:
        handler.flush()
    # libfuse's loop and the Butler's threads need no goodbye: the mount is gone already.
    os._exit(status)


def _watch(options: MountOptions) -> None:
    """Start the thread that cleans up when ``options.watch_pid`` dies."""
    assert options.watch_pid is not None
    try:
        pidfd = os.pidfd_open(options.watch_pid)
    except ProcessLookupError:
        _clean_up_and_exit(options)
        return

    def wait() -> None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll():
            pass
        _clean_up_and_exit(options)

    threading.Thread(target=wait, name="butlerfs-watch-parent", daemon=True).start()


def main(argv: list[str]) -> int:
    """Serve one mount; return the exit status."""
    options = MountOptions.from_json(argv[1])
    logging.basicConfig(
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s (%(process)d): %(message)s",
    )
    # httpx2 logs every request at INFO (a client/server Butler's queries, signed-URL reads):
    # thousands of lines per minute of reading, so only with --log-level DEBUG.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx2").setLevel(logging.WARNING)
    reporter = _Reporter(int(os.environ.pop(READY_FD_ENV)))
    if options.watch_pid is not None:
        _watch(options)
    try:
        serve(options, on_mounted=lambda: _mounted(options, reporter))
    except UsageError as err:
        reporter.send(f"error {err}")
        return 2
    except Exception as err:
        logging.getLogger("butlerfs.daemon").exception("Mount failed")
        reporter.send(f"error unexpected failure: {err} (see {options.log_file})")
        return 1
    reporter.send(f"error the filesystem stopped before it was ready (see {options.log_file})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
