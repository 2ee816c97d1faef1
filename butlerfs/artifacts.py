"""Open an artifact by its URI and read it by offset.

POSIX artifacts are read in place with ``pread`` into the caller's buffer (no copy
in Python, the GIL released during the system call). A member of an uncompressed
zip (``butler ingest-zip``) is a byte range of the zip file, read the same way;
a compressed member goes through `zipfile`.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import urllib.parse
import zipfile
from typing import Protocol

from .errors import FsError

__all__ = ["Reader", "extension_of", "local_path", "open_artifact", "probe_size"]

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


class _FileRange:
    """A byte range of a local file (the whole file, or a stored zip member)."""

    def __init__(self, path: str, start: int = 0, size: int | None = None) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._start = start
        self.size = os.fstat(self._fd).st_size - start if size is None else size
        if start == 0 and size is None:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read_into(self, buffer: memoryview, offset: int) -> int:
        if offset >= self.size:
            return 0
        want = min(len(buffer), self.size - offset)
        return os.preadv(self._fd, [buffer[:want]], self._start + offset)

    def close(self) -> None:
        os.close(self._fd)


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


def _open_zip_member(path: str, member: str) -> Reader:
    archive = zipfile.ZipFile(path)
    try:
        info = archive.getinfo(member)
    except KeyError:
        archive.close()
        raise FsError(errno.EIO, f"{member} is not in {path}") from None
    if info.compress_type != zipfile.ZIP_STORED:
        return _CompressedMember(archive, info)
    archive.close()
    with open(path, "rb") as stream:
        stream.seek(info.header_offset)
        signature, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(stream.read(_ZIP_LOCAL_HEADER.size))
    if signature != b"PK\x03\x04":
        raise FsError(errno.EIO, f"corrupt zip header for {member} in {path}")
    start = info.header_offset + 30 + name_len + extra_len
    return _FileRange(path, start, info.file_size)


def open_artifact(uri: str) -> Reader:
    """Open an artifact for reading.

    Raises
    ------
    FsError
        ``EIO`` when the artifact is missing or unreadable (the registry says it
        exists, so its absence is an I/O error of the datastore, not ``ENOENT``);
        ``EOPNOTSUPP`` for a URI scheme this version cannot read.
    """
    path = local_path(uri)
    if path is None:
        raise FsError(errno.EOPNOTSUPP, f"cannot read {uri}: only file:// datastores are supported")
    _, member = _split(uri)
    try:
        return _FileRange(path) if member is None else _open_zip_member(path, member)
    except FsError:
        raise
    except OSError as err:
        raise FsError(errno.EIO, f"cannot open {uri}: {err.strerror}") from None


def probe_size(uri: str) -> int:
    """Return an artifact's size when its datastore record does not give it."""
    reader = open_artifact(uri)
    try:
        return reader.size
    finally:
        reader.close()
