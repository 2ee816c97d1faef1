"""Lazy reads of remote artifacts: a fetch plan per reader, streamed GETs, single flight, the cache.

A read asks for the blocks it covers. A block comes from memory (recently fetched or
read), else the on-disk cache (checked against its CRC32C), else a GET. What a GET
covers is the plan of the artifact's `RemoteReader`, which watches its reads:

- the first read, and reads that jump about, fetch exactly the blocks they cover (a
  header read fetches a block or two, whatever the artifact's size); once reads keep
  jumping, each miss fetches an aligned chunk sized so that its extra bytes cost no more
  than a quarter of a request's first-byte latency (no extra bytes against S3, chunks
  of megabytes against a server whose every GET is slow); once a reader has jumped
  `_FILL_AFTER_JUMPS` times with reads of at least `_FILL_MIN_READ` bytes in an artifact
  that fits the disk cache comfortably (at most `Fetcher.fill_limit`), the rest of the
  artifact is fetched in the background as read-ahead parts, behind the reads that wait:
  a program that samples an image at random soon reads it from disk instead of paying a
  round trip per read (s3fs fetches every file whole from its first read). Header reads,
  even a walk through every HDU's header, read a few KiB per jump and never trigger it;
- reads that follow each other grow a read-ahead window, quadrupling from 1 MiB up to
  `Fetcher.window_limit` (`Fetcher.max_window`, and the open files' share of memory),
  fetched as parallel GETs whose size grows with the window up to a part size at which
  the first-byte latency costs a quarter of a part's time (8 MiB at 20 ms and 100 MB/s
  per connection; larger against a slow-to-answer server).

Each GET streams: its blocks are handed to readers as they arrive, so a large GET
costs no latency. GETs run on `concurrency` fetch threads, reads that wait first,
read-ahead after. A block being fetched is fetched once: concurrent readers of it wait
for the same slot. A read waits at most ``timeout`` seconds from its start, whatever
the queue, and then fails with ``EIO``; the kernel's immediate retry of a failed read
fails at once instead of waiting again.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import hashlib
import heapq
import itertools
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Protocol

from .cache import BLOCK_SIZE, BlockCache
from .errors import FsError
from .remote import abandon_when

__all__ = ["Fetcher", "RemoteObject", "RemoteReader", "Store"]

_LOG = logging.getLogger(__name__)

_MIB = 1 << 20
_NEAR = 16 * _MIB  # reads within this distance of the last one count as sequential
_FIRST_WINDOW = 1 * _MIB
_MIN_PART = 8 * _MIB  # the part size AWS recommends for S3
_MAX_PART = 4096 * _MIB  # a GET this long streams only as far ahead as the reader's window
_MAX_CHUNK = 64 * _MIB  # largest chunk a random read fetches
_STREAM_IDLE = 10.0  # seconds a GET held back by its reader's window waits before it is dropped
_FAILED_RETRY_WINDOW = 1.0  # seconds during which the kernel's retry of a failed read fails at once
_DEMAND, _AHEAD = 0, 1
_DISK_AHEAD = 32  # cached blocks a sequential reader has read from disk ahead of it (8 MiB)
_DISK_THREADS = 4
_FILL_AFTER_JUMPS = 2  # large random reads of one artifact before the rest of it is fetched behind them
_FILL_MIN_READ = 64 * 1024  # a header walk's reads (the kernel's 16 KiB or so per jump) stay below
_FILL_LIMIT = 1 << 30  # largest artifact fetched whole behind random reads (and 1/8 of the cache)


class Store(Protocol):
    """Where bytes come from: `~butlerfs.remote.ObjectStore` (S3) or `~butlerfs.http_store.HttpStore`.

    A store may also have ``iter_range(uri, start, end, block)``, yielding the blocks of
    ``[start, end)`` as they arrive; without it, a GET is delivered when complete.
    """

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
    latency: float | None = None
    """Least seconds to the first bytes of a GET of this object, once measured (queueing on a
    busy machine only ever adds to it)."""

    @property
    def blocks(self) -> int:
        """Number of blocks."""
        return (self.size + BLOCK_SIZE - 1) // BLOCK_SIZE

    def block_len(self, index: int) -> int:
        """Size of one block (the last may be short)."""
        return min(BLOCK_SIZE, self.size - index * BLOCK_SIZE)


class _Slot:
    """A block on its way: readers wait here until its GET delivers it or fails."""

    __slots__ = ("data", "done", "error", "part", "waiters")

    def __init__(self, part: _Part) -> None:
        self.part = part
        self.done = threading.Event()
        self.data: bytes | None = None
        self.error: FsError | None = None
        """Set when the GET failed; `None` with no data: abandoned read-ahead, ask again."""
        self.waiters = 0


@dataclasses.dataclass(eq=False)
class _Part:
    """One GET: blocks ``first`` to ``last`` of an object."""

    obj: RemoteObject
    first: int
    last: int
    priority: int
    seq: int

    def __lt__(self, other: _Part) -> bool:
        return (self.priority, self.seq) < (other.priority, other.seq)


class _Estimate:
    """What a GET costs: first-byte latency, and bytes per second on one connection (moving average)."""

    def __init__(self, latency: float = 0.02, rate: float = 100e6) -> None:
        self.latency = latency
        self.rate = rate

    def add_latency(self, seconds: float) -> None:
        self.latency += 0.3 * (seconds - self.latency)

    def add_rate(self, nbytes: int, seconds: float) -> None:
        """Bytes that arrived after the first block, and the seconds spent receiving them."""
        if nbytes >= 4 * BLOCK_SIZE and seconds > 0:
            self.rate += 0.3 * (nbytes / seconds - self.rate)


class Fetcher:
    """Shared by every open remote artifact of a mount.

    Parameters
    ----------
    store : `Store`
        Where bytes come from (``iter_range``, when it has one, streams).
    cache : `BlockCache`, optional
        Where they are kept.
    concurrency : `int`, optional
        Most GETs in flight at once, for the whole mount.
    timeout : `float`, optional
        Seconds a read may wait for its blocks before failing with ``EIO``.
    small_object : `int`, optional
        Artifacts up to this size are fetched whole on first read.
    max_window : `int`, optional
        Largest read-ahead window, in bytes.
    memory_blocks : `int`, optional
        Blocks kept in memory (fetched ahead, or read from disk); by default a whole
        window and two parts more.
    fill_limit : `int`, optional
        Largest artifact fetched whole behind a reader that keeps jumping about; by
        default 1 GiB or an eighth of the disk cache, whichever is smaller; 0 never
        (nor without a disk cache).
    """

    def __init__(
        self,
        store: Store,
        cache: BlockCache | None,
        *,
        concurrency: int = 16,
        timeout: float = 30.0,
        small_object: int = 2 * _MIB,
        max_window: int = 128 * _MIB,
        memory_blocks: int | None = None,
        fill_limit: int | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.concurrency = concurrency
        self.timeout = timeout
        self.small_object = small_object
        self.max_window = max_window
        self.estimate = _Estimate()
        if cache is None:
            self.fill_limit = 0
        else:
            self.fill_limit = min(_FILL_LIMIT, cache.limit // 8) if fill_limit is None else fill_limit
        self._filling: set[str] = set()
        """Keys whose rest is being fetched behind random reads (once per mount)."""
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: list[_Part] = []
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False
        self._seq = itertools.count()
        self._slots: dict[tuple[str, int], _Slot] = {}
        self._memory: collections.OrderedDict[tuple[str, int], bytes | memoryview] = collections.OrderedDict()
        """Blocks fetched or read from disk, oldest arrival first."""
        self._memory_blocks = memory_blocks or (max_window + 2 * _MIN_PART) // BLOCK_SIZE
        self._failed: dict[str, float] = {}
        """Per key, when a read of it last failed: reads that need a GET fail at once for a moment."""
        self._limit: dict[str, int] = {}
        """Per key, the last block GETs may deliver now: a long GET waits for its readers."""
        self._readers = collections.Counter[str]()
        self._moved = threading.Condition(self._lock)
        self._loading: dict[tuple[str, int], concurrent.futures.Future[None]] = {}
        self._disk: concurrent.futures.ThreadPoolExecutor | None = None
        self.served = collections.Counter[str]()
        """Blocks served from ``memory``, the disk ``cache``, or a ``fetch``; ``timeouts``; ``fills``."""

    def stats(self) -> dict[str, int]:
        """Counters of this mount's remote reads since it started."""
        return {
            "requests": self.store.requests,
            "bytes_fetched": self.store.bytes_fetched,
            "blocks_from_memory": self.served["memory"],
            "blocks_from_cache": self.served["cache"],
            "blocks_fetched": self.served["fetch"],
            "blocks_corrupt": self.cache.corrupt if self.cache is not None else 0,
            "reads_timed_out": self.served["timeouts"],
            "artifacts_filled": self.served["fills"],
        }

    def open(self, key: str, uri: str, size: int, base: int = 0, checksum: str | None = None) -> RemoteReader:
        """Open a remote artifact for reading; nothing is fetched yet."""
        obj = RemoteObject(key, uri, size, base, checksum)
        with self._lock:
            self._readers[key] += 1
        if self.cache is not None:
            self.cache.touch(key)
            try:
                obj.cached = {int(name) for name in os.listdir(self.cache.entry_dir(key)) if name.isdigit()}
            except FileNotFoundError:
                pass
        return RemoteReader(self, obj)

    # Planning helpers (the reader decides; these size what it asks for)

    def window_limit(self) -> int:
        """Largest read-ahead window now: the open files share the memory.

        Read-ahead beyond it would be evicted before its reader came (to be read back
        from disk, or fetched again without a disk cache), and more parts in flight than
        the memory holds only compete for the connections and the cores.
        """
        with self._lock:
            readers = max(1, len(self._readers))
        return max(_FIRST_WINDOW, min(self.max_window, self._memory_blocks * BLOCK_SIZE // (2 * readers)))

    def part_blocks(self, obj: RemoteObject) -> int:
        """Blocks per read-ahead GET: first-byte latency at most a quarter of a part's time."""
        latency = obj.latency if obj.latency is not None else self.estimate.latency
        size = 4 * latency * self.estimate.rate
        return _pow2_blocks(min(_MAX_PART, max(_MIN_PART, size)))

    def chunk_blocks(self, obj: RemoteObject) -> int:
        """Blocks per GET of a random read: its extra bytes cost at most a quarter of the latency."""
        latency = obj.latency if obj.latency is not None else self.estimate.latency
        return _pow2_blocks(min(_MAX_CHUNK, latency * self.estimate.rate / 4))

    def fill(self, obj: RemoteObject) -> None:
        """Fetch the rest of ``obj`` as read-ahead parts, once, if it fits `fill_limit`."""
        if not 0 < obj.size <= self.fill_limit or self.cache is None or not self.cache.writable:
            return  # on a full cache disk the rest would have nowhere to go
        with self._lock:
            if obj.key in self._filling or self._closed:
                return
            self._filling.add(obj.key)
            self.served["fills"] += 1
            self._moved.notify_all()  # GETs of it held back for a reader go on
        _LOG.debug("random reads of %s: fetching the rest of it behind them", obj.key)
        # Parts small enough to keep every fetch thread busy: a fill has no reader to follow
        # (`_wait_for_reader` holds back no GET of an artifact being filled).
        parts = min(self.part_blocks(obj), _pow2_blocks(max(_MIN_PART, obj.size / self.concurrency)))
        self.request(obj, 0, obj.blocks - 1, part_blocks=parts)

    # Scheduling

    def request(
        self,
        obj: RemoteObject,
        first: int,
        last: int,
        *,
        part_blocks: int = 0,
        demand: tuple[int, int] | None = None,
        aligned: bool = True,
        limit: int | None = None,
    ) -> None:
        """Start fetching the blocks of ``[first, last]`` that are neither held nor on their way.

        Parameters
        ----------
        obj : `RemoteObject`
            The artifact.
        first, last : `int`
            Blocks wanted.
        part_blocks : `int`, optional
            Largest GET in blocks, and the alignment of GETs (so that later requests of a
            stream keep whole parts); default `part_blocks`.
        demand : `tuple` [`int`, `int`], optional
            Blocks a read waits for now: their GETs go before read-ahead.
        aligned : `bool`, optional
            Split GETs at multiples of ``part_blocks`` (else only by length).
        limit : `int`, optional
            Last block the GETs may deliver before the reader comes closer; default ``last``.
        """
        part_blocks = part_blocks or self.part_blocks(obj)
        with self._lock:
            allow = last if limit is None else limit
            if allow > self._limit.get(obj.key, -1):
                self._limit[obj.key] = allow
                self._moved.notify_all()
            missing = [
                index
                for index in range(first, last + 1)
                if index not in obj.cached
                and (obj.key, index) not in self._memory
                and (obj.key, index) not in self._slots
            ]
            for run in _runs(missing, part_blocks, aligned):
                urgent = demand is not None and run[0] <= demand[1] and run[-1] >= demand[0]
                part = _Part(obj, run[0], run[-1], _DEMAND if urgent else _AHEAD, next(self._seq))
                for index in run:
                    self._slots[(obj.key, index)] = _Slot(part)
                heapq.heappush(self._queue, part)
            # Threads start as work comes, up to the concurrency limit.
            while (
                len(self._queue) > self._idle and len(self._threads) < self.concurrency and not self._closed
            ):
                thread = threading.Thread(
                    target=self._worker, name=f"butlerfs-fetch-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                self._idle += 1
                thread.start()
            self._work.notify(len(self._queue))

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._work.wait()
                if self._closed:
                    return
                part = heapq.heappop(self._queue)
                self._idle -= 1
            try:
                self._fetch(part)
            except Exception:  # a bug must not kill the thread and strand waiting readers
                _LOG.exception("Fetching %s blocks %d-%d failed", part.obj.uri, part.first, part.last)
                self._finish(part, part.first, FsError(errno.EIO, "internal error while fetching"))
            finally:
                with self._lock:
                    self._idle += 1

    def _nobody_waits(self, part: _Part, index: int) -> bool:
        """Whether no reader waits for a block of ``part`` from ``index`` on (read-ahead only)."""
        with self._lock:
            return all(
                (slot := self._slots.get((part.obj.key, i))) is None
                or slot.part is not part
                or not slot.waiters
                for i in range(index, part.last + 1)
            )

    def _fetch(self, part: _Part) -> None:
        obj = part.obj
        start = part.first * BLOCK_SIZE
        end = min((part.last + 1) * BLOCK_SIZE, obj.size)
        index = part.first
        sent = time.monotonic()
        first_at = None
        receiving = 0.0  # seconds spent waiting for bytes after the first block (not for the reader)
        stream = iter(self._stream(obj, start, end))
        try:
            with abandon_when(lambda: part.priority == _AHEAD and self._nobody_waits(part, index)):
                while index <= part.last:
                    if not self._wait_for_reader(obj, index):
                        raise FsError(errno.EIO, "abandoned: the reader went elsewhere")
                    before = time.monotonic()
                    block = next(stream, None)
                    if block is None:
                        raise FsError(errno.EIO, f"{obj.uri}: the store sent fewer blocks than asked for")
                    now = time.monotonic()
                    if first_at is None:
                        first_at = now
                        latency = now - sent
                        obj.latency = latency if obj.latency is None else min(obj.latency, latency)
                        self.estimate.add_latency(latency)
                    else:
                        receiving += now - before
                    self._deliver(obj, index, block)
                    index += 1
        except FsError as err:
            self._finish(part, index, err)
            return
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # a GET stopped early closes its connection
        if first_at is not None:
            self.estimate.add_rate((index - part.first - 1) * BLOCK_SIZE, receiving)
            _LOG.debug(
                "GET %s blocks %d-%d (%s): first bytes after %.3f s, %.3f s in all",
                obj.key,
                part.first,
                part.last,
                "demand" if part.priority == _DEMAND else "ahead",
                first_at - sent,
                time.monotonic() - sent,
            )
        if self.cache is not None and obj.checksum and len(obj.cached) == obj.blocks:
            self._verify(obj)

    def _wait_for_reader(self, obj: RemoteObject, index: int) -> bool:
        """Hold a GET back until a reader's window reaches block ``index``; `False` to drop it."""
        deadline = time.monotonic() + _STREAM_IDLE
        with self._lock:
            # Once the whole artifact is wanted (`fill`), no GET of it waits for a reader.
            while index > self._limit.get(obj.key, -1) and obj.key not in self._filling:
                remaining = deadline - time.monotonic()
                if not self._readers[obj.key] or self._closed or remaining <= 0:
                    return False
                self._moved.wait(remaining)
        return True

    def close(self, obj: RemoteObject) -> None:
        """A reader of ``obj`` is done: GETs held back for its key go once no reader is left."""
        with self._lock:
            self._readers[obj.key] -= 1
            if self._readers[obj.key] <= 0:
                del self._readers[obj.key]
                self._limit.pop(obj.key, None)
                self._moved.notify_all()

    def _stream(self, obj: RemoteObject, start: int, end: int) -> Iterable[bytes]:
        """The blocks of ``[start, end)`` of ``obj``, as they arrive."""
        stream = getattr(self.store, "iter_range", None)
        if stream is not None:
            yield from stream(obj.uri, obj.base + start, obj.base + end, BLOCK_SIZE)
            return
        data = self.store.get_range(obj.uri, obj.base + start, obj.base + end)
        for offset in range(0, len(data), BLOCK_SIZE):
            yield data[offset : offset + BLOCK_SIZE]

    def _deliver(self, obj: RemoteObject, index: int, block: bytes) -> None:
        """Hand one arrived block to memory, its waiting readers and the disk cache."""
        key = (obj.key, index)
        with self._lock:
            self._memory[key] = block
            self._memory.move_to_end(key)
            while len(self._memory) > self._memory_blocks:
                self._memory.popitem(last=False)
            self._failed.pop(obj.key, None)  # bytes arrive again
        # On disk before the slot goes and its waiters wake: a prefetch that returns has
        # everything cached (readers meanwhile find the block in memory).
        if self.cache is not None and index not in obj.cached:
            try:
                if self.cache.write_block(obj.key, index, block):
                    obj.cached.add(index)
            except OSError as err:  # the cache is an optimisation: the read goes on
                _LOG.warning("Could not cache block %d of %s: %s", index, obj.uri, err)
        with self._lock:
            slot = self._slots.pop(key, None)
        if slot is not None:
            slot.data = block
            slot.done.set()

    def _finish(self, part: _Part, index: int, err: FsError) -> None:
        """Release the blocks of ``part`` from ``index`` on: failed, or abandoned read-ahead."""
        abandoned = "abandoned" in (err.strerror or "")
        now = time.monotonic()
        with self._lock:
            slots = []
            for i in range(index, part.last + 1):
                slot = self._slots.get((part.obj.key, i))
                if slot is not None and slot.part is part:
                    del self._slots[(part.obj.key, i)]
                    slots.append(slot)

            if not abandoned and any(slot.waiters for slot in slots):
                self._failed[part.obj.key] = now
        for slot in slots:
            slot.error = None if abandoned else err
            slot.done.set()

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
                obj.cached.discard(index)
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

    def read_blocks_into(
        self, obj: RemoteObject, first: int, buffer: memoryview, offset: int, deadline: float
    ) -> int:
        """Copy bytes from ``offset`` into ``buffer`` from blocks ``first`` on; return the count.

        Raises
        ------
        FsError
            ``EIO`` when a block cannot be had before ``deadline`` (`time.monotonic`).
        """
        done = 0
        index = first
        while done < len(buffer):
            start = offset + done - index * BLOCK_SIZE
            block = self._block(obj, index, deadline)
            want = min(len(buffer) - done, len(block) - start)
            buffer[done : done + want] = block[start : start + want]
            done += want
            index += 1
        return done

    def _block(self, obj: RemoteObject, index: int, deadline: float) -> bytes | memoryview:
        key = (obj.key, index)
        while True:
            with self._lock:
                held = self._memory.get(key)
                if held is not None:
                    # No move to the end: memory is first in, first out, so that blocks read
                    # ahead and not yet read go after the ones a reader has just passed.
                    self.served["memory"] += 1
                    return held
                slot = self._slots.get(key)
                failed = self._failed.get(obj.key)
                loading = self._loading.get(key)
                mine = None
                if loading is None and index in obj.cached and self.cache is not None:
                    # A block is read from disk once at a time, as it is fetched once.
                    mine = self._loading[key] = concurrent.futures.Future()
            if loading is not None:  # being read from disk by another reader or ahead
                loading.result()
                continue
            if mine is not None:
                try:
                    block = self._load(obj, index)
                finally:
                    with self._lock:
                        self._loading.pop(key, None)
                    mine.set_result(None)
                if block is not None:
                    self.served["cache"] += 1
                    return block
                continue
            if failed is not None and time.monotonic() - failed < _FAILED_RETRY_WINDOW:
                # The kernel follows a failed read with more requests for the same read()
                # (the rest of its range, then a retry of the page it needs): they must not
                # each wait another timeout.
                raise FsError(errno.EIO, f"block {index} of {obj.uri}: a read of it failed just now")
            if slot is None:
                self.request(obj, index, index, part_blocks=1, demand=(index, index), aligned=False)
                continue
            data = self._wait(obj, index, slot, deadline)
            if data is not None:
                self.served["fetch"] += 1
                return data

    def _wait(self, obj: RemoteObject, index: int, slot: _Slot, deadline: float) -> bytes | None:
        """Wait for a slot until ``deadline``; its data, or `None` to look again (abandoned)."""
        with self._lock:
            slot.waiters += 1
            if slot.part.priority == _AHEAD and slot.part in self._queue:
                # A reader needs it now: move it before the read-ahead.
                slot.part.priority = _DEMAND
                heapq.heapify(self._queue)
        try:
            if not slot.done.wait(max(0.0, deadline - time.monotonic())):
                with self._lock:
                    self.served["timeouts"] += 1
                    self._failed[obj.key] = time.monotonic()
                raise FsError(errno.EIO, f"block {index} of {obj.uri}: no answer within {self.timeout:g} s")
        finally:
            with self._lock:
                slot.waiters -= 1
        if slot.error is not None:
            raise FsError(errno.EIO, slot.error.strerror or "fetch failed")
        return slot.data

    def _load(self, obj: RemoteObject, index: int) -> bytes | None:
        """Read a cached block from disk into memory; `None` if it is gone or corrupt (then fetch it)."""
        assert self.cache is not None
        block = self.cache.read_block(obj.key, index, obj.block_len(index))
        if block is None:
            obj.cached.discard(index)
            return None
        with self._lock:
            self._memory[(obj.key, index)] = block
            while len(self._memory) > self._memory_blocks:
                self._memory.popitem(last=False)
        return block

    def preload(self, obj: RemoteObject, first: int, last: int) -> None:
        """Read cached blocks of ``[first, last]`` from disk into memory, in parallel, ahead of a reader."""
        if self.cache is None:
            return
        with self._lock:
            if self._closed:
                return
            wanted = [
                index
                for index in range(first, last + 1)
                if index in obj.cached
                and (obj.key, index) not in self._memory
                and (obj.key, index) not in self._loading
            ]
            if not wanted:
                return
            if self._disk is None:
                self._disk = concurrent.futures.ThreadPoolExecutor(_DISK_THREADS, "butlerfs-disk")
            for index in wanted:
                self._loading[(obj.key, index)] = self._disk.submit(self._preload_one, obj, index)

    def _preload_one(self, obj: RemoteObject, index: int) -> None:
        try:
            self._load(obj, index)
        finally:
            with self._lock:
                self._loading.pop((obj.key, index), None)

    def fetch_all(self, obj: RemoteObject) -> None:
        """Bring every block of ``obj`` into the cache (for prefetch); wait for it."""
        self.request(obj, 0, obj.blocks - 1)
        for index in range(obj.blocks):
            if index in obj.cached:
                continue
            while True:
                with self._lock:
                    slot = self._slots.get((obj.key, index))
                if slot is None:
                    break
                slot.done.wait()
                if slot.error is not None:
                    raise FsError(errno.EIO, slot.error.strerror or "fetch failed")
                if slot.data is not None:
                    break
            if index not in obj.cached and (
                self.cache is None or self.cache.read_block(obj.key, index, obj.block_len(index)) is None
            ):
                self._block(obj, index, time.monotonic() + self.timeout)

    def shutdown(self) -> None:
        """Stop the fetch threads (a GET in progress completes in the background)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._work.notify_all()
            self._moved.notify_all()
            disk, self._disk = self._disk, None
        if disk is not None:
            disk.shutdown(wait=False, cancel_futures=True)


class RemoteReader:
    """One open remote artifact: watches its reads to plan what each GET covers."""

    def __init__(self, fetcher: Fetcher, obj: RemoteObject) -> None:
        self._fetcher = fetcher
        self.obj = obj
        self.size = obj.size
        self._lock = threading.Lock()
        self._next = 0
        self._window = 0
        self._reads = 0
        self._jumps = 0
        self._large_jumps = 0
        self._run_start = 0

    def read_into(self, buffer: memoryview, offset: int) -> int:
        """Fill ``buffer`` from ``offset``; return the number of bytes read."""
        deadline = time.monotonic() + self._fetcher.timeout
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
                self._jumps += self._reads > 0
                self._large_jumps += self._reads > 0 and end - offset >= _FILL_MIN_READ
                self._window, self._run_start = 0, offset
            elif end - self._run_start > 2 * BLOCK_SIZE:
                # Only a run past its first two blocks grows a window: a FITS header read
                # arrives as a few sequential requests inside them.
                self._window = min(fetcher.window_limit(), max(_FIRST_WINDOW, self._window * 4))
            self._reads += 1
            self._next = max(self._next, end) if sequential else end
            window, jumps, large_jumps = self._window, self._jumps, self._large_jumps
        _LOG.debug("read %s [%d, %d): window %d, jumps %d", obj.key, offset, end, window, jumps)
        if obj.size <= fetcher.small_object:
            fetcher.request(obj, 0, obj.blocks - 1, part_blocks=obj.blocks, demand=(first, last))
        elif window:
            fetcher.preload(obj, last + 1, min(obj.blocks - 1, last + _DISK_AHEAD))
            # Demand and read-ahead in one request, its end rounded up to a part boundary:
            # parts stay whole and aligned, so a full window keeps issuing whole parts. A
            # part longer than the window streams only as far as the window reaches.
            parts = fetcher.part_blocks(obj)
            ahead = last + window // BLOCK_SIZE
            stop = (ahead // parts + 1) * parts - 1
            fetcher.request(
                obj, first, min(obj.blocks - 1, stop), part_blocks=parts, demand=(first, last), limit=ahead
            )
        elif jumps >= 2:
            # Random access: an aligned chunk around the read, as large as the latency makes free.
            chunk = max(1, fetcher.chunk_blocks(obj))
            lo, hi = first // chunk * chunk, min(obj.blocks - 1, (last // chunk + 1) * chunk - 1)
            fetcher.request(obj, lo, hi, part_blocks=chunk, demand=(first, last))
            if large_jumps >= _FILL_AFTER_JUMPS:
                fetcher.fill(obj)
        else:
            fetcher.request(
                obj, first, last, part_blocks=last - first + 1, demand=(first, last), aligned=False
            )
        return fetcher.read_blocks_into(obj, first, buffer[: end - offset], offset, deadline)

    def close(self) -> None:
        """Let GETs held back for this reader go: blocks stay cached, other fetches complete."""
        self._fetcher.close(self.obj)


def _pow2_blocks(nbytes: float) -> int:
    """The largest power of two of blocks within ``nbytes`` (at least one block)."""
    blocks = max(1, int(nbytes // BLOCK_SIZE))
    return 1 << (blocks.bit_length() - 1)


def _runs(indices: list[int], longest: int, aligned: bool = True) -> Iterable[list[int]]:
    """Split sorted indices into runs of consecutive values.

    Runs stay within aligned parts of ``longest`` values, or hold at most ``longest``
    values when not ``aligned``.
    """
    run: list[int] = []
    for index in indices:
        if run and (index != run[-1] + 1 or (index % longest == 0 if aligned else len(run) == longest)):
            yield run
            run = []
        run.append(index)
    if run:
        yield run
