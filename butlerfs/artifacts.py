"""Open an artifact by its URI and read it by offset.

POSIX artifacts are read in place with ``pread`` into the caller's buffer (no copy
in Python, the GIL released during the system call). Remote artifacts (``s3://``, or
a Butler server's ``https://`` download URLs) are read through a
`~butlerfs.fetch.Fetcher` (ranged GETs, read-ahead, the block cache). A member of an
uncompressed zip (``butler ingest-zip``) is a byte range of the zip, read the same way
as a whole artifact; a deflated member goes through `zipfile`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import struct
import threading
import urllib.parse
import zipfile
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Protocol

from .errors import FsError

if TYPE_CHECKING:
    from .fetch import Fetcher

__all__ = ["ArtifactOpener", "Reader", "extension_of", "local_path"]

_REMOTE_SCHEMES = ("s3://", "https://", "http://")
"""Read through the fetcher: S3 objects, and a Butler server's download URLs."""
_COMPRESSION_SUFFIXES = frozenset({".gz", ".fz", ".bz2", ".xz", ".zst"})
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... name length, extra length


class Reader(Protocol):
    """An open artifact."""

    size: int

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` from ``offset``; return the number of bytes read (0 at the end)."""

    def close(self) -> None:
        """Release the artifact."""


def _split(uri: str) -> tuple[str, str | None]:
    """Return the URI without fragment and the zip member, if any."""
    base, _, fragment = uri.partition("#")
    member = None
    if fragment:
        unquoted = urllib.parse.unquote(fragment)
        if unquoted.startswith("zip-path="):
            member = unquoted[len("zip-path=") :]
    return base, member


def local_path(uri: str) -> str | None:
    """Return the POSIX path of a ``file://`` URI (without any fragment), else `None`."""
    base, _ = _split(uri)
    parsed = urllib.parse.urlsplit(base)
    if parsed.scheme in ("", "file"):
        return urllib.parse.unquote(parsed.path)
    return None


def extension_of(uri: str) -> str:
    """Return the artifact's extension: ``.fits``, ``.fits.fz``, ``.parq`` or empty."""
    base, member = _split(uri)
    name = member if member is not None else urllib.parse.unquote(urllib.parse.urlsplit(base).path)
    name = name.rsplit("/", 1)[-1]
    stem, dot, last = name.rpartition(".")
    if not dot or not stem:
        return ""
    ext = "." + last
    if ext.lower() in _COMPRESSION_SUFFIXES:
        stem2, dot2, prev = stem.rpartition(".")
        if dot2 and stem2 and prev.isalnum() and len(prev) <= 5:
            ext = f".{prev}{ext}"
    return ext


def _read_ahead_bytes() -> int:
    """The daemon's own read-ahead of local artifacts (``BUTLERFS_POSIX_READ_AHEAD_KB``)."""
    try:
        return max(0, int(os.environ.get("BUTLERFS_POSIX_READ_AHEAD_KB", "4096"))) * 1024
    except ValueError:
        return 4096 * 1024


_READ_AHEAD = _read_ahead_bytes()
_NEAR = 1 << 20
"""How far from the last read's end a read still counts as sequential."""
_PIECE = 1 << 20
_STREAMING = 512 << 10
"""Bytes read sequentially before the daemon reads ahead (a header read never triggers it)."""


class _FileRange:
    """A byte range of a local file (the whole file, or a stored zip member).

    A sequential reader, once past its first ``_STREAMING`` bytes, gets the daemon's own
    read-ahead: ``POSIX_FADV_WILLNEED`` on the next ``_READ_AHEAD`` bytes whenever it has read
    half of what was advised before. Where the mount's kernel read-ahead is not raised (a
    user's mount: only root may), the kernel asks for 128 KiB at a time with one or two
    requests in flight, so each request would wait for the disk; with the file's pages on
    their way, most are served from the page cache. Concurrent requests may race on the two
    counters: that only moves when the next advice is given.
    """

    def __init__(self, path: str, start: int = 0, size: int | None = None) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._start = start
        self.size = os.fstat(self._fd).st_size - start if size is None else size
        if start == 0 and size is None:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        self._next = 0
        self._advised = 0

    def read_into(self, buffer: memoryview, offset: int) -> int:
        if offset >= self.size:
            return 0
        want = min(len(buffer), self.size - offset)
        end = offset + want
        if abs(offset - self._next) <= _NEAR:  # sequential, give or take requests served out of order
            self._next = max(self._next, end)
            if (
                _READ_AHEAD
                and self._next >= _STREAMING
                and self._advised < self.size
                and end + _READ_AHEAD // 2 > self._advised
            ):
                ahead = max(self._advised, end)
                self._advised = min(end + _READ_AHEAD, self.size)
                # The kernel caps one WILLNEED at the file's read-ahead or the disk's largest I/O.
                for piece in range(ahead, self._advised, _PIECE):
                    length = min(_PIECE, self._advised - piece)
                    os.posix_fadvise(self._fd, self._start + piece, length, os.POSIX_FADV_WILLNEED)
        else:
            self._next = end
        return os.preadv(self._fd, [buffer[:want]], self._start + offset)

    def close(self) -> None:
        os.close(self._fd)


class _ReaderFile(io.RawIOBase):
    """A seekable file object over a `Reader`, for `zipfile`."""

    def __init__(self, reader: Reader) -> None:
        self._reader = reader
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._reader.size}[whence]
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = self._reader.read_into(memoryview(buffer).cast("B"), self._pos)
        self._pos += count
        return count


class _CompressedMember:
    """A deflated zip member: correct, not fast (seeking backwards re-inflates)."""

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
        self._archive = archive
        self._stream = archive.open(info)
        self._lock = threading.Lock()
        self.size = info.file_size

    def read_into(self, buffer: memoryview, offset: int) -> int:
        with self._lock:
            self._stream.seek(offset)
            data = self._stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._stream.close()
        self._archive.close()


def _zip_member(stream: IO[bytes], member: str, where: str) -> tuple[zipfile.ZipFile, zipfile.ZipInfo, int]:
    """Return the archive, the member's info and the offset of its data."""
    archive = zipfile.ZipFile(stream)
    try:
        info = archive.getinfo(member)
    except KeyError:
        archive.close()
        raise FsError(errno.EIO, f"{member} is not in {where}") from None
    stream.seek(info.header_offset)
    signature, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(stream.read(_ZIP_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        archive.close()
        raise FsError(errno.EIO, f"corrupt zip header for {member} in {where}")
    return archive, info, info.header_offset + 30 + name_len + extra_len


def _zip_size(fetcher: Fetcher, zip_key: str, uri: str) -> int:
    """Return a remote zip's size, kept in its cache entry: a remount asks nothing of the store."""
    cache = fetcher.cache
    if cache is None:
        return fetcher.store.size(uri)
    path = os.path.join(cache.entry_dir(zip_key), "size")
    try:
        with open(path) as stream:
            return int(stream.read())
    except (OSError, ValueError):
        pass
    size = fetcher.store.size(uri)
    temp = f"{path}.{os.getpid()}.{threading.get_ident()}"
    try:  # a cache that cannot hold it only costs a request next time
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(temp, "w") as stream:
            stream.write(str(size))
        os.replace(temp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temp)
    return size


class ArtifactOpener:
    """Opens artifacts by URI: POSIX in place, remote through a fetcher.

    Parameters
    ----------
    fetcher : callable, optional
        Returns the mount's `~butlerfs.fetch.Fetcher`; called on the first remote
        open, so a POSIX-only mount never starts one.
    """

    def __init__(self, fetcher: Callable[[], Fetcher] | None = None) -> None:
        self._fetcher_factory = fetcher
        self._fetcher: Fetcher | None = None
        self._lock = threading.Lock()

    def fetcher(self) -> Fetcher:
        """Return the fetcher for remote artifacts."""
        with self._lock:
            if self._fetcher is None:
                if self._fetcher_factory is None:
                    raise FsError(errno.EOPNOTSUPP, "this mount cannot read remote artifacts")
                self._fetcher = self._fetcher_factory()
            return self._fetcher

    def open(self, uri: str, key: str, size: int, checksum: str | None = None) -> Reader:
        """Open an artifact for reading.

        Parameters
        ----------
        uri : `str`
            The artifact's URI, with a ``#zip-path=`` fragment for a zip member.
        key : `str`
            Its cache key: dataset UUID, plus ``.component``.
        size : `int`
            Its size from the datastore record (-1 if unknown).
        checksum : `str`, optional
            Its checksum from the datastore record.

        Raises
        ------
        FsError
            ``EIO`` when the artifact is missing or unreadable (the registry says it
            exists, so its absence is an I/O error of the datastore, not ``ENOENT``);
            ``EOPNOTSUPP`` for a URI scheme butlerfs cannot read.
        """
        base, member = _split(uri)
        path = local_path(uri)
        try:
            if path is not None:
                return self._open_local(path, member)
            if base.startswith(_REMOTE_SCHEMES):
                return self._open_remote(base, member, key, size, checksum)
        except FsError:
            raise
        except OSError as err:
            raise FsError(errno.EIO, f"cannot open {uri}: {err.strerror or err}") from None
        raise FsError(
            errno.EOPNOTSUPP,
            f"cannot read {uri}: only file:// and s3:// datastores and Butler servers are supported",
        )

    def _open_local(self, path: str, member: str | None) -> Reader:
        if member is None:
            return _FileRange(path)
        with open(path, "rb") as stream:
            archive, info, start = _zip_member(stream, member, path)
        archive.close()
        if info.compress_type != zipfile.ZIP_STORED:
            return _CompressedMember(zipfile.ZipFile(path), info)
        return _FileRange(path, start, info.file_size)

    def _open_remote(self, uri: str, member: str | None, key: str, size: int, checksum: str | None) -> Reader:
        fetcher = self.fetcher()
        if member is None:
            if size < 0:
                size = fetcher.store.size(uri)
            return fetcher.open(key, uri, size, checksum=checksum)
        # The zip's central directory is read (and cached) through the fetcher too.
        zip_key = "zip-" + hashlib.sha1(uri.encode()).hexdigest()[:32]
        whole = fetcher.open(zip_key, uri, _zip_size(fetcher, zip_key, uri))
        stream = io.BufferedReader(_ReaderFile(whole), buffer_size=64 * 1024)
        archive, info, start = _zip_member(stream, member, uri)
        if info.compress_type != zipfile.ZIP_STORED:
            return _CompressedMember(archive, info)
        archive.close()
        return fetcher.open(key, uri, info.file_size, base=start, checksum=checksum)

    def stats(self) -> dict[str, int]:
        """Counters of remote reads (empty before the first remote open)."""
        return self._fetcher.stats() if self._fetcher is not None else {}

    def size(self, uri: str, key: str) -> int:
        """Return an artifact's size when its datastore record does not give it."""
        reader = self.open(uri, key, -1)
        try:
            return reader.size
        finally:
            reader.close()

    def close(self) -> None:
        """Stop the fetcher, if one was started."""
        if self._fetcher is not None:
            self._fetcher.shutdown()
