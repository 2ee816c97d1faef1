"""The on-disk cache of remote artifacts: blocks of bytes keyed by dataset UUID.

Datasets are immutable per UUID, so a cached block never goes stale and needs no
validation against the server. An entry is a directory named by its key (the dataset
UUID, plus ``.component`` for a component) holding one file per block of
`BLOCK_SIZE` bytes that has been fetched; a FITS header read therefore caches one
or two blocks, not the object. Blocks are written to a temporary name and renamed, so
a reader in this or another mount sharing the directory sees a block whole or not at
all.

Every block file carries the CRC32C of its bytes (4 bytes, big-endian, after the data),
written with it and checked on every read from disk: a block of the wrong size or whose
bytes do not match is deleted, counted (`BlockCache.corrupt`) and fetched again. The
layout is versioned (``v2/`` under the cache directory); blocks of older layouts carry
no checksum and are removed when a cache is opened.

Eviction is least-recently-used by entry: opening an entry touches its directory,
and when the cache grows past its limit the oldest entries are removed until it is
under 90% of the limit. Another process may be reading an evicted entry: its open
block files stay readable, and missing blocks are fetched again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import threading
import uuid

import google_crc32c

__all__ = ["BLOCK_SIZE", "LAYOUT", "BlockCache", "CacheInfo", "crc32c", "default_cache_dir"]

_LOG = logging.getLogger(__name__)

BLOCK_SIZE = 256 << 10
"""Cache and fetch granularity: a header read caches < 1% of a large object, a random
256 KiB read fetches what it reads."""

LAYOUT = "v2"
"""Directory of this layout: v1 had no checksums, v2 ends every block with its CRC32C."""
_OLDLAYOUT = re.compile(r"v\d+")
_CRC = 4


def crc32c(data: bytes) -> bytes:
    """Return the CRC32C of ``data`` as 4 big-endian bytes (the block files' trailer)."""
    return google_crc32c.value(data).to_bytes(_CRC, "big")


def default_cache_dir() -> str:
    """Return ``$XDG_CACHE_HOME/butlerfs`` (``~/.cache/butlerfs`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "butlerfs")


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """What ``butlerfs cache info`` shows."""

    path: str
    entries: int
    bytes: int
    limit: int


class BlockCache:
    """Blocks of remote artifacts on local disk, with an LRU size limit.

    Parameters
    ----------
    root : `str`
        Cache directory; created if missing; may be shared by several mounts.
    limit : `int`
        Size limit in bytes.
    """

    def __init__(self, root: str, limit: int) -> None:
        self.root = os.path.abspath(root)
        self.limit = limit
        self._dir = os.path.join(self.root, LAYOUT)
        os.makedirs(self._dir, exist_ok=True)
        self._remove_old_layouts()
        self._lock = threading.Lock()
        self._used = self._scan_size()
        self._writable = True
        self.corrupt = 0
        """Blocks discarded because their size or checksum was wrong."""

    def _remove_old_layouts(self) -> None:
        """Delete blocks of older layouts: they carry no checksum to check them by."""
        for name in os.listdir(self.root):
            if _OLDLAYOUT.fullmatch(name) and name != LAYOUT:
                _LOG.info("Removing the %s layout of the cache %s (no checksums)", name, self.root)
                self._remove_entry(os.path.join(self.root, name))

    def entry_dir(self, key: str) -> str:
        """Return the directory of one entry."""
        return os.path.join(self._dir, key[:2], key)

    def block_path(self, key: str, index: int) -> str:
        """Return the file of one block."""
        return os.path.join(self.entry_dir(key), f"{index:08d}")

    def touch(self, key: str) -> None:
        """Mark an entry as used now (for LRU eviction)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.entry_dir(key))

    def read_block(self, key: str, index: int, expected: int) -> bytes | None:
        """Return a cached block's bytes, checked against its CRC32C; `None` if absent or corrupt.

        A corrupt block (wrong size, or bytes that do not match their checksum) is
        deleted, counted in `corrupt` and logged: the caller fetches it again.
        """
        path = self.block_path(key, index)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            data = os.pread(fd, expected, 0)
            trailer = os.pread(fd, _CRC + 1, expected)
        finally:
            os.close(fd)
        if len(data) != expected or len(trailer) != _CRC:
            problem = f"{len(data) + len(trailer) - _CRC} bytes, expected {expected}"
        elif crc32c(data) != trailer:
            problem = "its bytes do not match their CRC32C"
        else:
            return data
        _LOG.warning("Discarding corrupt cache block %s (%s); fetching it again", path, problem)
        with self._lock:
            self.corrupt += 1
        self.discard_block(key, index)
        return None

    def has_block(self, key: str, index: int) -> bool:
        """Whether a block is cached (its size is checked when read)."""
        return os.path.exists(self.block_path(key, index))

    @property
    def writable(self) -> bool:
        """Whether blocks are being stored (`False` once the disk filled up, until space is freed)."""
        return self._writable

    def write_block(self, key: str, index: int, data: bytes) -> bool:
        """Store a block atomically; return whether it was stored.

        A full disk is not an error: reads go on from memory, with one warning.
        """
        if not self._writable:
            return False
        directory = self.entry_dir(key)
        temp = os.path.join(directory, f".{index:08d}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # the entry's first block (or the entry was evicted)
                os.makedirs(directory, exist_ok=True)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                trailer = crc32c(data)
                if os.writev(fd, [data, trailer]) != len(data) + len(trailer):
                    raise OSError(errno.ENOSPC, "short write")  # the disk filled up mid-block
            finally:
                os.close(fd)
            os.replace(temp, self.block_path(key, index))
        except OSError as err:
            with contextlib.suppress(OSError):
                os.remove(temp)
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                with self._lock:  # concurrent fetches hit the full disk together: warn once
                    first, self._writable = self._writable, False
                if first:
                    _LOG.warning("Cache disk %s is full: reads go on without caching", self.root)
                return False
            raise
        with self._lock:
            self._used += len(data) + _CRC
            over = self._used > self.limit
        if over:
            self.evict()
        return True

    def evict(self, target: float = 0.9) -> int:
        """Remove least-recently-used entries until under ``target`` of the limit.

        Returns
        -------
        removed : `int`
            Bytes removed.
        """
        with self._lock:
            entries = sorted(self._entries(), key=lambda e: e[1])
            used = sum(size for _, _, size in entries)
            removed = 0
            for path, _, size in entries:
                if used - removed <= self.limit * target:
                    break
                self._remove_entry(path)
                removed += size
            self._used = used - removed
            self._writable = True  # space was freed, or another process freed some
        if removed:
            _LOG.info("Evicted %d bytes from the cache %s", removed, self.root)
        return removed

    def info(self) -> CacheInfo:
        """Return the entries and bytes held now."""
        entries = list(self._entries())
        return CacheInfo(self.root, len(entries), sum(size for _, _, size in entries), self.limit)

    def clear(self) -> None:
        """Remove every entry."""
        with self._lock:
            for path, _, _ in list(self._entries()):
                self._remove_entry(path)
            self._used = 0

    def clear_entry(self, key: str) -> None:
        """Remove one entry (a corrupt one, say)."""
        self._remove_entry(self.entry_dir(key))

    def discard_block(self, key: str, index: int) -> None:
        """Remove one corrupt block."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.block_path(key, index))

    def _remove_entry(self, path: str) -> None:
        # Rename first so that the entry disappears at once for other processes.
        trash = f"{path}.evicted.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)

    def _entries(self) -> list[tuple[str, float, int]]:
        found = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self._dir) as shards:
            for shard in shards:
                if not shard.is_dir():
                    continue
                with os.scandir(shard.path) as entries:
                    for entry in entries:
                        if not entry.is_dir() or ".evicted." in entry.name:
                            continue
                        size = 0
                        with contextlib.suppress(FileNotFoundError), os.scandir(entry.path) as blocks:
                            for block in blocks:
                                with contextlib.suppress(FileNotFoundError):
                                    size += block.stat().st_size
                        with contextlib.suppress(FileNotFoundError):
                            found.append((entry.path, entry.stat().st_mtime, size))
        return found

    def _scan_size(self) -> int:
        return sum(size for _, _, size in self._entries())
