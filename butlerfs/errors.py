"""Errors that carry their errno, and the user-facing error of the CLI."""

from __future__ import annotations

import errno
import os

__all__ = ["FsError", "UsageError", "not_found", "read_only"]


class FsError(OSError):
    """A filesystem error with the errno the FUSE boundary returns.

    Subclassing `OSError` lets the FUSE binding turn it into ``-errno``
    without a translation table.
    """

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message or os.strerror(code))


class UsageError(Exception):
    """A mistake of the user: the CLI prints it as one line and exits non-zero.

    The message says what is wrong and how to fix it; no traceback is shown.
    """


def not_found(path: str) -> FsError:
    """Return the error for a path that names nothing in the mount."""
    return FsError(errno.ENOENT, f"no such file or directory: {path}")


def read_only(path: str) -> FsError:
    """Return the error for any attempt to modify the mount."""
    return FsError(errno.EROFS, f"butlerfs is read-only: {path}")
