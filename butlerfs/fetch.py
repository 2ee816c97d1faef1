"""Lazy reads of remote artifacts: ranged GETs, read-ahead, single flight, the block cache.

A read asks for the blocks it covers. A block comes from memory (recently fetched),
else the on-disk cache, else a ranged GET. Reads that look sequential grow a
read-ahead window (mountpoint-s3 style: doubling up to `Fetcher.max_window`), filled
by parallel GETs of up to ``part_size`` bytes, all through one thread pool whose size
is the global concurrency limit. A block being fetched is fetched once: concurrent
readers of it wait on the same future. Artifacts below ``small_object`` bytes come
whole in one GET.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Protocol

from .cache import BLOCK_SIZE, BlockCache
from .errors import FsError

__all__ = ["Fetcher", "RemoteObject", "RemoteReader", "Store"]

_LOG = logging.getLogger(__name__)

_NEAR = 16 * BLOCK_SIZE  # reads within this distance of the last one count as sequential


class Store(Protocol):
    """Where bytes come from: `~butlerfs.remote.ObjectStore` (S3) or `~butlerfs.http_store.HttpStore`."""

    requests: int
    bytes_fetched: int

    def get_range(self, uri: str, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)`` of an object."""

    def size(self, uri: str) -> int:
        """Return an object's size."""


@dataclasses.dataclass(eq=False)
class RemoteObject:
    """An artifact in an object store, or a byte range of one (a stored zip member)."""

    key: str
    """Cache key: the dataset UUID, plus ``.component``."""
    uri: str
    size: int
    base: int = 0
    """Offset of the artifact's first byte in the object."""
    checksum: str | None = None
    cached: set[int] = dataclasses.field(default_factory=set)
    """Blocks known to be in the disk cache."""

    @property
    def blocks(self) -> int:
        """Number of blocks."""
        return (self.size + BLOCK_SIZE - 1) // BLOCK_SIZE

    def block_len(self, index: int) -> int:
        """Size of one block (the last may be short)."""
        return min(BLOCK_SIZE, self.size - index * BLOCK_SIZE)


class Fetcher:
    """Shared by every open remote artifact of a mount.

    Parameters
    ----------
    store : `Store`
        Where bytes come from.
    cache : `BlockCache`, optional
        Where they are kept.
    concurrency : `int`, optional
        Most GETs in flight at once, for the whole mount.
    part_size : `int`, optional
        Largest single GET, in bytes.
    small_object : `int`, optional
        Artifacts up to this size are fetched whole on first read.
    max_window : `int`, optional
        Largest read-ahead window, in bytes.
    memory_blocks : `int`, optional
        Recently fetched blocks kept in memory (serving reads without a disk round
        trip, and all reads when the cache disk is full); by default a whole window
        plus the parts in flight.
    """

    def __init__(
        self,
        store: Store,
        cache: BlockCache | None,
        *,
        concurrency: int = 16,
        part_size: int = 8 * BLOCK_SIZE,
        small_object: int = 2 * BLOCK_SIZE,
        max_window: int = 256 * BLOCK_SIZE,
        memory_blocks: int | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.part_blocks = max(1, part_size // BLOCK_SIZE)
        self.small_object = small_object
        self.max_window = max_window
        self._pool = concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix="butlerfs-fetch")
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, int], concurrent.futures.Future[dict[int, bytes]]] = {}
        self._memory: collections.OrderedDict[tuple[str, int], bytes] = collections.OrderedDict()
        # Room for a whole read-ahead window plus the parts in flight: blocks fetched ahead
        # must still be held when the reader gets there (always so without a disk cache).
        self._memory_blocks = memory_blocks or max_window // BLOCK_SIZE + concurrency * self.part_blocks
        self.served = collections.Counter[str]()
        """Blocks served from ``memory``, the disk ``cache``, or a ``fetch``."""

    def stats(self) -> dict[str, int]:
        """Counters of this mount's remote reads since it started."""
        return {
            "requests": self.store.requests,
            "bytes_fetched": self.store.bytes_fetched,
            "blocks_from_memory": self.served["memory"],
            "blocks_from_cache": self.served["cache"],
            "blocks_fetched": self.served["fetch"],
        }

    def open(self, key: str, uri: str, size: int, base: int = 0, checksum: str | None = None) -> RemoteReader:
        """Open a remote artifact for reading; nothing is fetched yet."""
        obj = RemoteObject(key, uri, size, base, checksum)
        if self.cache is not None:
            self.cache.touch(key)
            with contextlib.suppress(FileNotFoundError):
                obj.cached = {int(name) for name in os.listdir(self.cache.entry_dir(key)) if name.isdigit()}
        return RemoteReader(self, obj)

    # Scheduling

    def request(self, obj: RemoteObject, first: int, last: int) -> None:
        """Start fetching the blocks of ``[first, last]`` that are neither held nor in flight."""
        missing: list[int] = []
        with self._lock:
            for index in range(first, last + 1):
                key = (obj.key, index)
                if index in obj.cached or key in self._memory or key in self._inflight:
                    continue
                missing.append(index)
            for run in _runs(missing, self.part_blocks):
                future = self._pool.submit(self._fetch, obj, run[0], run[-1])
                for index in run:
                    self._inflight[(obj.key, index)] = future

    def _fetch(self, obj: RemoteObject, first: int, last: int) -> dict[int, bytes]:
        start = first * BLOCK_SIZE
        end = min((last + 1) * BLOCK_SIZE, obj.size)
        try:
            data = self.store.get_range(obj.uri, obj.base + start, obj.base + end)
            blocks = {
                i: data[(i - first) * BLOCK_SIZE : (i - first + 1) * BLOCK_SIZE]
                for i in range(first, last + 1)
            }
            with self._lock:
                for index, block in blocks.items():
                    self._memory[(obj.key, index)] = block
                    self._memory.move_to_end((obj.key, index))
                while len(self._memory) > self._memory_blocks:
                    self._memory.popitem(last=False)
            if self.cache is not None:
                for index, block in blocks.items():
                    if self.cache.write_block(obj.key, index, block):
                        obj.cached.add(index)
                if obj.checksum and len(obj.cached) == obj.blocks:
                    self._verify(obj)
            return blocks
        finally:
            with self._lock:
                for index in range(first, last + 1):
                    self._inflight.pop((obj.key, index), None)

    def _verify(self, obj: RemoteObject) -> None:
        """Check a completely cached artifact against the datastore's checksum once."""
        assert self.cache is not None and obj.checksum is not None
        marker = os.path.join(self.cache.entry_dir(obj.key), "verified")
        if os.path.exists(marker):
            return
        hasher = hashlib.blake2b()
        for index in range(obj.blocks):
            block = self.cache.read_block(obj.key, index, obj.block_len(index))
            if block is None:
                return
            hasher.update(block)
        if hasher.hexdigest() != obj.checksum:
            _LOG.warning("Cached %s fails its checksum: discarding it", obj.uri)
            obj.cached.clear()
            self.cache.clear_entry(obj.key)
            return
        with open(marker, "w"):
            pass

    # Reading

    def read_block_into(self, obj: RemoteObject, index: int, view: memoryview, start: int) -> int:
        """Copy block ``index`` from byte ``start`` into ``view``; return the bytes copied."""
        length = obj.block_len(index)
        want = min(len(view), length - start)
        with self._lock:
            held = self._memory.get((obj.key, index))
        if held is None and index in obj.cached and self.cache is not None:
            if self._read_cached(obj, index, view[:want], start, length):
                self.served["cache"] += 1
                return want
        if held is None:
            held = self._wait(obj, index)
            self.served["fetch"] += 1
        else:
            self.served["memory"] += 1
        view[:want] = held[start : start + want]
        return want

    def _read_cached(self, obj: RemoteObject, index: int, view: memoryview, start: int, length: int) -> bool:
        assert self.cache is not None
        try:
            fd = os.open(self.cache.block_path(obj.key, index), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # evicted, perhaps by another mount sharing the cache
            obj.cached.discard(index)
            return False
        try:
            if os.fstat(fd).st_size != length:
                obj.cached.discard(index)
                self.cache.discard_block(obj.key, index)
                return False
            return os.preadv(fd, [view], start) == len(view)
        finally:
            os.close(fd)

    def _wait(self, obj: RemoteObject, index: int) -> bytes:
        for _ in range(3):
            with self._lock:
                future = self._inflight.get((obj.key, index))
                held = self._memory.get((obj.key, index))
            if held is not None:
                return held
            if future is None:
                self.request(obj, index, index)
                continue
            blocks = future.result()  # raises the FsError of a failed GET
            if index in blocks:
                return blocks[index]
        raise FsError(errno.EIO, f"could not obtain block {index} of {obj.uri}")

    def fetch_all(self, obj: RemoteObject) -> None:
        """Bring every block of ``obj`` into the cache (for prefetch)."""
        self.request(obj, 0, obj.blocks - 1)
        for index in range(obj.blocks):
            if index not in obj.cached:
                with self._lock:
                    future = self._inflight.get((obj.key, index))
                if future is not None:
                    future.result()

    def shutdown(self) -> None:
        """Stop the fetch threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class RemoteReader:
    """One open remote artifact: tracks its read pattern to size the read-ahead."""

    def __init__(self, fetcher: Fetcher, obj: RemoteObject) -> None:
        self._fetcher = fetcher
        self.obj = obj
        self.size = obj.size
        self._lock = threading.Lock()
        self._next = 0
        self._window = 0
        self._reads = 0
        self._run_start = 0

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` from ``offset``; return the number of bytes read."""
        obj = self.obj
        if offset >= obj.size:
            return 0
        end = min(offset + len(buffer), obj.size)
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        fetcher = self._fetcher
        with self._lock:
            # The kernel's parallel read-ahead requests arrive slightly out of order.
            sequential = self._reads > 0 and abs(offset - self._next) <= _NEAR
            if not sequential:
                self._window, self._run_start = 0, offset
            elif end - self._run_start > BLOCK_SIZE:
                # Only a run longer than one block grows a window: with the kernel's default
                # 128 KiB read-ahead (an unprivileged mount cannot raise it) a FITS header read
                # arrives as two or three sequential requests inside the first block.
                self._window = min(fetcher.max_window, max(BLOCK_SIZE, self._window * 2))
            self._reads += 1
            self._next = max(self._next, end) if sequential else end
            window = self._window
        if obj.size <= fetcher.small_object:
            fetcher.request(obj, 0, obj.blocks - 1)
        elif window:
            # Demand and read-ahead in one request, its end rounded up to a part boundary:
            # parts stay whole and aligned (as boto3's are), so a full window never
            # degenerates into one small GET per read.
            parts = fetcher.part_blocks
            stop = ((last + window // BLOCK_SIZE) // parts + 1) * parts - 1
            fetcher.request(obj, first, min(obj.blocks - 1, stop))
        else:
            fetcher.request(obj, first, last)
        done = 0
        for index in range(first, last + 1):
            start = (offset + done) - index * BLOCK_SIZE
            done += fetcher.read_block_into(obj, index, buffer[done : end - offset], start)
        return done

    def close(self) -> None:
        """Nothing to release: blocks stay cached, fetches in flight complete."""


def _runs(indices: list[int], longest: int) -> Iterator[list[int]]:
    """Split sorted indices into runs of consecutive values within aligned parts of ``longest``."""
    run: list[int] = []
    for index in indices:
        if run and (index != run[-1] + 1 or index % longest == 0):
            yield run
            run = []
        run.append(index)
    if run:
        yield run
