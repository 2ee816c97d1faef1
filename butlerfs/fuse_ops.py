"""The FUSE adapter: the one module that imports the FUSE binding (mfusepy).

Each operation translates a call into `ButlerSource` and nothing else; errors are
`OSError` subclasses carrying their errno, which mfusepy returns as ``-errno``.
Reads go straight into the kernel's buffer (``preadv`` on a view of it), which
saves a copy per request and releases the GIL during the read.

Directory listings answer the kernel's ``READDIRPLUS`` with every entry's attributes
(mfusepy 3.1.1 passes only the mode, so the kernel then looked each entry up: three
requests per dataset). With them the kernel caches the entries and their attributes,
and a walk needs no ``LOOKUP`` or ``GETATTR``.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import stat
import threading
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

from .source import ButlerSource, Entry  # noqa: E402

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


_CAP_READDIRPLUS_AUTO = 1 << 14  # FUSE_CAP_READDIRPLUS_AUTO (fuse_common.h)

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
        if conn is not None:
            # Always READDIRPLUS: in "auto" mode the kernel asks for attributes only in a
            # directory's first request, and looks up every later entry one by one.
            conn.want &= ~_CAP_READDIRPLUS_AUTO
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
        # Registers the callback; _ZeroCopyFUSE.readdir_fuse_3 answers it with attributes.
        return [".", "..", *(entry.name for entry in self.source.scandir(path))]

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


_READDIR_PLUS = 1  # enum fuse_readdir_flags: FUSE_READDIR_PLUS
_FILL_DIR_PLUS = 2  # enum fuse_fill_dir_flags: FUSE_FILL_DIR_PLUS
_LISTINGS_KEPT = 64
_LISTED_ENTRIES_KEPT = 100_000


class _ZeroCopyFUSE(mfusepy.FUSE):
    """mfusepy's FUSE with a read that fills the kernel buffer in place, and readdirplus.

    Directory entries are given with offsets (their position plus one): libfuse 3.14
    drops the attributes of ``READDIRPLUS`` entries given without (it replies with
    inode 0, which the kernel ignores, and looks every entry up). The kernel then asks
    for a directory in several requests; a listing made at offset 0 is kept for the
    requests that continue it, until the one past its end (the reader is done).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._listings: collections.OrderedDict[bytes, list[Entry]] = collections.OrderedDict()
        self._listings_lock = threading.Lock()
        self._listed = 0
        super().__init__(*args, **kwargs)

    def _listing(self, path: bytes, offset: int) -> list[Entry]:
        with self._listings_lock:
            entries = self._listings.get(path) if offset else None
        if entries is None:
            source: ButlerSource = self.operations.source
            entries = source.scandir(path.decode(self.encoding, self.errors))
            with self._listings_lock:
                old = self._listings.pop(path, None)
                self._listed += len(entries) - (len(old) if old is not None else 0)
                self._listings[path] = entries
                while len(self._listings) > 1 and (
                    len(self._listings) > _LISTINGS_KEPT or self._listed > _LISTED_ENTRIES_KEPT
                ):
                    self._listed -= len(self._listings.popitem(last=False)[1])
        return entries

    def _forget(self, path: bytes, entries: list[Entry]) -> None:
        with self._listings_lock:
            if self._listings.get(path) is entries:  # not a newer listing of the same directory
                del self._listings[path]
                self._listed -= len(entries)

    def readdir_fuse_3(
        self, path: bytes | None, buf: Any, filler: Any, offset: int, fip: Any, flags: int
    ) -> int:
        key = path or b"/"
        entries = self._listing(key, offset)
        if offset >= len(entries) + 2:
            # The kernel asks past the end once a reader has read everything: drop the
            # listing now (a walk would otherwise keep up to _LISTED_ENTRIES_KEPT entries).
            self._forget(key, entries)
            return 0
        plus = _FILL_DIR_PLUS if flags & _READDIR_PLUS else 0
        st = mfusepy.c_stat()
        uid, gid = self.operations.source.owner
        st.st_uid, st.st_gid, st.st_nlink, st.st_blksize = uid, gid, 1, PREFERRED_IO_SIZE
        position = offset
        if position < 2:
            st.st_mode = stat.S_IFDIR
            for name in (b".", b"..")[position:]:
                position += 1
                if filler(buf, name, st, position, 0):
                    return 0
        encoding, errors = self.encoding, self.errors
        for entry in itertools.islice(entries, position - 2, None):
            st.st_mode = entry.mode
            st.st_size = entry.size
            st.st_blocks = (entry.size + 511) // 512
            seconds, nanos = divmod(int(entry.mtime * 1e9), 1_000_000_000)
            for stamp in (st.st_mtimespec, st.st_ctimespec, st.st_atimespec):
                stamp.tv_sec, stamp.tv_nsec = seconds, nanos
            position += 1
            if filler(buf, entry.name.encode(encoding, errors), st, position, plus):
                break
        return 0

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
        # libfuse 3.14.0 logs "Ignoring invalid max threads value 4294967295" when this is
        # left unset (its "unset" value fails its own check). As many as may run: idle
        # threads are kept, as libfuse's default does.
        options["max_idle_threads"] = MAX_THREADS
    if allow_other:
        options["allow_other"] = True
    version = libfuse_version()
    source.runtime["libfuse"] = version
    _LOG.info("Serving %s on libfuse %s (%s)", mountpoint, version, mfusepy._libfuse_path)
    _ZeroCopyFUSE(ButlerFuse(source, on_ready), mountpoint, **options)
