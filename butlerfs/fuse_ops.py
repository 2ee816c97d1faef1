"""The FUSE adapter: the one module that imports the FUSE binding (mfusepy).

Each operation translates a call into `ButlerSource` and nothing else; errors are
`OSError` subclasses carrying their errno, which mfusepy returns as ``-errno``.
Reads go straight into the kernel's buffer (``preadv`` on a view of it), which
saves a copy per request and releases the GIL during the read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
from collections.abc import Callable
from ctypes.util import find_library
from typing import Any

from .errors import FsError, UsageError, read_only


def _pin_libfuse3() -> None:
    # mfusepy looks for libfuse 2 first; where both are installed (s3fs, sshfs and
    # AppImage support pull in libfuse2) it would silently run on 2, which never calls
    # init_with_config (no kernel page cache, no read-ahead settings). The variable is
    # read once, when mfusepy is imported; a user's own setting wins.
    if os.environ.get("FUSE_LIBRARY_PATH") or os.environ.get("FUSE_LIBRARY_NAME"):
        return
    path = find_library("fuse3")
    if path is None:
        raise UsageError(
            "libfuse 3 is not installed (only libfuse 2 or none was found): "
            "install it (Debian: apt-get install fuse3 libfuse3-3)"
        )
    os.environ["FUSE_LIBRARY_PATH"] = path


_pin_libfuse3()

import mfusepy  # noqa: E402  (after the library is pinned)

from .source import ButlerSource  # noqa: E402

__all__ = ["ButlerFuse", "libfuse_version", "run_fuse"]

_LOG = logging.getLogger(__name__)


def libfuse_version() -> str:
    """Return the version of the libfuse mfusepy loaded (``3.14.0``), and check it is 3.

    Raises
    ------
    UsageError
        Raised when the library is libfuse 2 (a user's ``FUSE_LIBRARY_PATH`` or
        ``FUSE_LIBRARY_NAME`` pointing at it).
    """
    lib = mfusepy._libfuse
    version = f"{mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor}"
    with contextlib.suppress(AttributeError):
        lib.fuse_pkgversion.restype = ctypes.c_char_p
        version = lib.fuse_pkgversion().decode()
    if mfusepy.fuse_version_major != 3:
        raise UsageError(
            f"butlerfs needs libfuse 3, but {mfusepy._libfuse_path} is libfuse {version}: unset "
            "FUSE_LIBRARY_PATH and FUSE_LIBRARY_NAME (or point them at libfuse3.so.3)"
        )
    return version


# The size userspace buffers its reads by (Python's open, stdio). Kernel requests
# to the daemon are sized by the kernel's read-ahead, not by this; a larger value
# turns a 4 KiB header read into a 1 MiB read and, with the read-ahead it starts,
# a fetch of megabytes from a remote datastore.
PREFERRED_IO_SIZE = 128 << 10


class ButlerFuse(mfusepy.Operations):
    """mfusepy operations over a `ButlerSource`.

    Parameters
    ----------
    source : `ButlerSource`
        What the mount shows.
    on_ready : callable, optional
        Called once the kernel has mounted the filesystem.
    """

    use_ns = True

    def __init__(self, source: ButlerSource, on_ready: Callable[[], None] | None = None) -> None:
        self.source = source
        self._on_ready = on_ready

    def init_with_config(self, conn: Any, config: Any) -> None:
        # Datasets are immutable per UUID: let the kernel cache attributes for the
        # refresh interval and keep file pages across opens while size and mtime
        # (the ingest date) are unchanged. Missing names are not cached, so new
        # datasets appear as soon as the listing is refreshed.
        if config is not None:
            timeout = float(self.source.refresh)
            config.entry_timeout = timeout
            config.attr_timeout = timeout
            config.negative_timeout = 0.0
            config.auto_cache = 1
            config.kernel_cache = 0
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        self.source.close()

    def getattr(self, path: str, fh: Any = None) -> dict[str, Any]:
        attrs = self.source.getattr(path)
        uid, gid = self.source.owner
        mtime_ns = int(attrs.mtime * 1e9)
        return {
            "st_mode": attrs.mode,
            "st_size": attrs.size,
            "st_nlink": attrs.nlink,
            "st_uid": uid,
            "st_gid": gid,
            "st_mtime": mtime_ns,
            "st_ctime": mtime_ns,
            "st_atime": mtime_ns,
            "st_blksize": PREFERRED_IO_SIZE,
            "st_blocks": (attrs.size + 511) // 512,
        }

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *(name for name, _ in self.source.listdir(path))]

    def open(self, path: str, flags: int) -> int:
        return self.source.open(path, flags)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return self.source.read(fh, size, offset)

    def release(self, path: str, fh: int) -> int:
        self.source.release(fh)
        return 0

    def statfs(self, path: str) -> dict[str, int]:
        return self.source.statfs()

    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        value = self.source.xattrs(path).get(name)
        if value is None:
            raise FsError(mfusepy.ENOATTR)
        return value

    def listxattr(self, path: str) -> list[str]:
        return list(self.source.xattrs(path))

    def access(self, path: str, amode: int) -> int:
        self.source.lookup(path)
        if amode & os.W_OK:
            raise read_only(path)
        return 0

    # Everything that would change the tree fails early with EROFS.
    def _refuse(self, path: str, *args: Any) -> None:
        raise read_only(path)

    create = mkdir = unlink = rmdir = chmod = chown = truncate = utimens = _refuse
    setxattr = removexattr = write = mknod = _refuse

    def rename(self, old: str, new: str) -> None:
        raise read_only(old)

    def link(self, target: str, source: str) -> None:
        raise read_only(target)

    def symlink(self, target: str, source: str) -> None:
        raise read_only(target)


class _ZeroCopyFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with a read that fills the kernel buffer in place."""

    def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
        source: ButlerSource = self.operations.source
        address = ctypes.cast(buf, ctypes.c_void_p).value
        if not address:
            return -errno.EFAULT
        view = memoryview((ctypes.c_char * size).from_address(address)).cast("B")
        return source.read_into(fip.contents.fh, view, offset)


MAX_THREADS = 64
"""Most requests the daemon serves at once (libfuse's ``max_threads``)."""


def run_fuse(
    source: ButlerSource,
    mountpoint: str,
    *,
    on_ready: Callable[[], None] | None = None,
    threads: bool = True,
    allow_other: bool = False,
    debug: bool = False,
) -> None:
    """Mount ``source`` at ``mountpoint`` and serve requests until unmounted.

    Parameters
    ----------
    source : `ButlerSource`
        What to show.
    mountpoint : `str`
        An empty directory.
    on_ready : callable, optional
        Called once mounted.
    threads : `bool`, optional
        Serve requests on several threads (reads then overlap).
    allow_other : `bool`, optional
        Let other users see the mount (needs ``user_allow_other`` for non-root).
    debug : `bool`, optional
        libfuse's debug output on stderr.
    """
    options: dict[str, Any] = {
        "foreground": True,
        "nothreads": not threads,
        "ro": True,
        "fsname": "butlerfs",
        "subtype": "butlerfs",
        "debug": debug,
    }
    if threads:
        # libfuse 3.14 serves at most 10 requests at once by default: ten reads waiting on a
        # stalled endpoint would hold every other request (a stat, a listing, the kernel's
        # retry of a failed read) in the kernel. Waiting threads cost little.
        options["max_threads"] = MAX_THREADS
    if allow_other:
        options["allow_other"] = True
    version = libfuse_version()
    source.runtime["libfuse"] = version
    _LOG.info("Serving %s on libfuse %s (%s)", mountpoint, version, mfusepy._libfuse_path)
    _ZeroCopyFUSE(ButlerFuse(source, on_ready), mountpoint, **options)
