"""Entry point of the background mount process: ``python -m butlerfs.daemon OPTIONS_JSON``.

Reports ``ok`` or ``error <message>`` once on the pipe named by ``BUTLERFS_READY_FD``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

from .errors import UsageError
from .mounting import READY_FD_ENV, MountOptions, serve


class _Reporter:
    """Writes the one status line; later calls do nothing (the fd may be reused)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._lock = threading.Lock()

    def send(self, line: str) -> None:
        with self._lock:
            if self._fd is None:
                return
            try:
                os.write(self._fd, line.replace("\n", " ").encode() + b"\n")
            finally:
                os.close(self._fd)
                self._fd = None


def main(argv: list[str]) -> int:
    """Serve one mount; return the exit status."""
    options = MountOptions.from_json(argv[1])
    logging.basicConfig(
        level=options.log_level,
        format="%(asctime)s %(levelname)s %(name)s (%(process)d): %(message)s",
    )
    reporter = _Reporter(int(os.environ.pop(READY_FD_ENV)))
    try:
        serve(options, on_mounted=lambda: reporter.send("ok"))
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
