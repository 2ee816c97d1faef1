"""The filesystem's meaning, independent of FUSE.

`ButlerSource` resolves paths to directories and files, lists directories lazily
from the registry, gives attributes and extended attributes, and reads artifacts.
The FUSE adapter calls it and nothing else, so all of this is testable without a
kernel. Paths are POSIX strings rooted at ``/``.

Listing strategy. Each dataset type's tree is loaded in pieces, each hung on a `Slot`:
the whole subtree under a partial data ID, or the subtrees of a run of sibling values
(``detector`` 40 to 49). A slot holding at most ``subtree_limit`` datasets is fetched
in one query (with the datastore records) as a compact `~butlerfs.listing.Chunk`;
a larger one becomes a `Level`: the next dimension's distinct values (fetched when the
directory is first listed), split into slots of about ``subtree_limit`` datasets each,
loaded when first reached. So the first ``ls`` of any directory fetches at most about
``subtree_limit`` datasets, and a walk needs about one query per ``subtree_limit``
datasets. A path looked up through a level not listed yet, or first in a run not loaded
yet, loads its own value's subtree alone (`Level.peeks`).

Chunks are held up to ``memory_limit`` bytes; beyond it the least recently used are
dropped and loaded again when reached, from the on-disk index (`butlerfs.index`) if
there is one, else from the registry. Every loaded piece is trusted for ``refresh``
seconds; after that, the next listing of it (or lookup of a name it lacks) asks the
registry for the type's state token (`RepoIndex.state`, a few counts) and reloads
the piece only if the token changed.
"""

from __future__ import annotations

import array
import bisect
import collections
import contextlib
import ctypes
import errno
import itertools
import json
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from . import artifacts
from .errors import FsError, UsageError, not_found, read_only
from .index import DiskIndex
from .layout import DataIdValue, dimension_dir, parse_dimension_dir
from .listing import Chunk, candidate_values
from .registry import (
    Artifact,
    DatasetEntry,
    DatasetTypeInfo,
    RegistryUnavailableError,
    RepoIndex,
    state_since,
    state_total,
)

__all__ = ["Attributes", "ButlerSource", "Directory", "File", "Layout", "MtimeSource"]

_LOG = logging.getLogger(__name__)

XATTR_PREFIX = "user.butler."
STATS_XATTR = "user.butlerfs.stats"

Layout = Literal["default", "flat"]
"""``default``: one directory per required dimension. ``flat``: no directory for the
last one, its datasets' files sit in the directory above (names are unchanged)."""

MtimeSource = Literal["ingest", "listed"]
"""A file's mtime: its dataset's ingest date, or when the mount first listed it."""

STATE_REUSE = 1.0
"""Seconds a type's state token, once checked, answers further checks (a walk of expired
listings would otherwise check it once per piece)."""

SINCE_RENEWAL = 3600.0
"""Seconds after which an unchanged state token is made again from a recent ``since``."""

ISOLATE_ABOVE = 1_000
"""Datasets a run of siblings is expected to hold above which the first lookup of one of its
values, before the run is loaded, fetches that value's subtree alone: an ``ls`` of one
directory waits for its own datasets, not for its 2,500 siblings'. The next lookup of
another value loads the run whole, as the index stores it (a walk's one extra query per run)."""

PEEKS_BEFORE_LISTING = 16
"""Values looked up under a level not listed yet (each its own query, found or not) after
which it is listed: a program opening many paths by their data IDs then reads runs of them."""

_DIRS_KEPT = 256
"""Directories remembered by path, so that listing a child does not resolve from the root."""

_DIR_MODE = stat.S_IFDIR | 0o755
_FILE_MODE = stat.S_IFREG | 0o644

Fixed = tuple[tuple[str, DataIdValue], ...]


@dataclass(frozen=True, slots=True)
class Attributes:
    """What ``stat`` shows; the FUSE adapter turns it into a ``struct stat``."""

    mode: int
    size: int
    mtime: float
    nlink: int = 1
    extra: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class File:
    """One artifact of one dataset."""

    dataset: DatasetEntry
    artifact: Artifact
    size: int

    @property
    def key(self) -> str:
        """Cache key: the dataset UUID, plus ``.component`` for a component."""
        component = self.artifact.component
        return f"{self.dataset.id}.{component}" if component else str(self.dataset.id)


@dataclass(eq=False, slots=True)
class Level:
    """A directory with too many datasets below it to fetch at once.

    Its next dimension's distinct values, cut into runs of siblings, one `Slot` each;
    ``starts[k]`` is the index of the first value of ``slots[k]``. The values are fetched
    when the directory is first listed (``values`` is `None` until then): a path looked up
    through it needs only its own value's subtree, a `peek`.
    """

    fixed: Fixed
    dimension: str
    values: Sequence[DataIdValue] | None
    """Sorted; integers as one machine word each (`_compact`)."""
    starts: list[int]
    slots: list[Slot]
    per_value: float = 0.0
    """Datasets per value, on average when the level was listed."""
    count: float = 0.0
    """Datasets below the level (an upper bound)."""
    peeks: dict[DataIdValue, Slot] = field(default_factory=dict)
    """Values loaded on their own (looked up before the level was listed, or first of their run)."""
    misses: int = 0
    """Names looked up and not found before the level was listed."""
    retired: bool = False
    """Dropped (reloaded or evicted with its parent): readers holding it look again from the top."""

    @property
    def nbytes(self) -> int:
        """Bytes held, roughly."""
        return 200 + _values_nbytes(self.values) + 150 * len(self.slots)

    def slot_of(self, index: int) -> Slot:
        """The slot holding value number ``index``."""
        return self.slots[bisect.bisect_right(self.starts, index) - 1]


@dataclass(eq=False, slots=True)
class Slot:
    """Where one loaded piece of a type's tree hangs.

    ``group`` is `None` for the whole subtree under ``fixed``, else
    ``(dimension, values)``: the subtrees of those sibling values.
    """

    dataset_type: str
    fixed: Fixed
    group: tuple[str, tuple[DataIdValue, ...]] | None = None
    parent: Level | None = None
    node: Chunk | Level | None = None
    version: int = -1
    checked_at: float = float("-inf")
    nbytes: int = 0
    retired: bool = False
    """Replaced by its halves, or dropped with its level: never loaded again."""

    @property
    def key(self) -> str:
        """Where the piece sits, as the on-disk index names it."""
        return json.dumps([self.dataset_type, [list(kv) for kv in self.fixed], self.group])


@dataclass(eq=False)
class _TypeState:
    """What the source knows of one dataset type's registry state."""

    info: DatasetTypeInfo
    root: Slot
    token: str | None = None
    version: int = 0
    checked_at: float = float("-inf")
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(eq=False, slots=True)
class Directory:
    """A directory: the root, a dataset type, or one dimension value below it.

    Either a `Level` (its values are listed) or the rows ``lo:hi`` of a `Chunk`.
    """

    state: _TypeState | None
    fixed: Fixed = ()
    slot: Slot | None = None
    level: Level | None = None
    chunk: Chunk | None = None
    lo: int = 0
    hi: int = 0

    @property
    def dataset_type(self) -> DatasetTypeInfo | None:
        """The dataset type this directory belongs to (`None` for the root)."""
        return self.state.info if self.state is not None else None


@dataclass(frozen=True, slots=True)
class Entry:
    """One directory entry with what ``readdirplus`` needs."""

    name: str
    mode: int
    size: int
    mtime: float


class _RetryError(Exception):
    """A piece on the way was replaced while this request waited: resolve the path again."""


class ButlerSource:
    """Paths, listings, attributes and reads of a mounted repository.

    Parameters
    ----------
    index : `RepoIndex`
        The registry queries.
    refresh : `float`, optional
        Seconds a listing is trusted before the registry is asked whether it changed.
    subtree_limit : `int`, optional
        Most datasets fetched by one query. The default keeps a run's load, the first
        ``ls`` of its second directory, near 0.2 s at 10^6 datasets on PostgreSQL (a run of
        5,000 took 0.33-0.69 s); a walk of the default layout then makes twice the queries
        of 5,000, about 1% slower.
    opener : `~butlerfs.artifacts.ArtifactOpener`, optional
        Opens artifacts; the default reads POSIX artifacts only.
    clock : callable, optional
        Monotonic clock, replaceable in tests.
    memory_limit : `int`, optional
        Bytes of listings held; beyond it the least recently used are dropped.
    index_dir : `str`, optional
        Directory of the persistent listing index; `None` for none.
    layout : `Layout`, optional
        Directory layout.
    mtime : `MtimeSource`, optional
        Where file mtimes come from.
    """

    def __init__(
        self,
        index: RepoIndex,
        *,
        refresh: float = 60.0,
        subtree_limit: int = 2_500,
        opener: artifacts.ArtifactOpener | None = None,
        clock: Callable[[], float] = time.monotonic,
        memory_limit: int = 1 << 30,
        index_dir: str | None = None,
        layout: Layout = "default",
        mtime: MtimeSource = "ingest",
    ) -> None:
        if layout not in ("default", "flat"):
            raise UsageError(f"unknown layout {layout!r}: use default or flat")
        if mtime not in ("ingest", "listed"):
            raise UsageError(f"unknown mtime source {mtime!r}: use ingest or listed")
        self._index = index
        self._opener = opener or artifacts.ArtifactOpener()
        self.refresh = refresh
        self._subtree_limit = max(subtree_limit, 1)
        self._clock = clock
        self._memory_limit = memory_limit
        self._layout = layout
        self._mtime = mtime
        self._lock = threading.RLock()
        self._handles: dict[int, artifacts.Reader] = {}
        self._next_handle = itertools.count(1)
        self._mounted_at = time.time()
        self._uid, self._gid = os.getuid(), os.getgid()
        self._lru: collections.OrderedDict[Slot, None] = collections.OrderedDict()
        self._dirs: collections.OrderedDict[str, Directory] = collections.OrderedDict()
        self._held = 0
        self._counters = collections.Counter[str]()
        self.runtime: dict[str, str] = {}
        """Facts about the serving process shown in the stats attribute (``libfuse``)."""
        self._types = {
            name: _TypeState(info, Slot(name, ())) for name, info in index.dataset_types.items()
        }
        self._disk: DiskIndex | None = None
        if index_dir is not None:
            signature = {**index.signature(), "subtree_limit": self._subtree_limit, "mtime": mtime}
            self._disk = DiskIndex(index_dir, signature)
        self._root = Directory(None)

    # -- resolution and listing ---------------------------------------------------------------

    def lookup(self, path: str) -> Directory | File:
        """Return the node at ``path``.

        Raises
        ------
        FsError
            ``ENOENT`` if nothing is there; ``ENOTDIR`` if a file is used as a directory.
        """
        return _retrying(path, lambda: self._lookup(path))

    def _lookup(self, path: str) -> Directory | File:
        parts = [part for part in path.split("/") if part]
        node: Directory | File = self._root
        start = 0
        # A walk lists each directory's children right after it: start from the deepest
        # directory resolved recently rather than from the root.
        for depth in (len(parts), len(parts) - 1):
            if depth > 0:
                cached = self._dirs.get("/".join(parts[:depth]))
                if cached is not None and _current(cached):
                    node, start = cached, depth
                    break
        for k in range(start, len(parts)):
            name = parts[k]
            if isinstance(node, File):
                raise FsError(errno.ENOTDIR, f"not a directory: {path}")
            child = self._child(node, name)
            if child is None and self._stale(node):
                # A name missing from a stale listing may exist now: with the registry down,
                # that is EIO, not ENOENT.
                node = self._revalidated(node, keep_stale=False)
                child = self._child(node, name)
            if child is None:
                raise not_found(path)
            node = child
            if isinstance(node, Directory):
                self._remember("/".join(parts[: k + 1]), node)
        return node

    def _remember(self, key: str, node: Directory) -> None:
        dirs = self._dirs
        dirs[key] = node
        if len(dirs) > _DIRS_KEPT:
            with contextlib.suppress(KeyError):
                dirs.popitem(last=False)

    def listdir(self, path: str) -> list[tuple[str, Directory | File]]:
        """Return the entries of a directory, sorted by name."""

        def listed() -> list[tuple[str, Directory | File]]:
            node = self._fresh_directory(path)
            found: list[tuple[str, Directory | File]] = []
            for entry in self._entries(node):
                child = self._child(node, entry.name)
                if child is not None:
                    found.append((entry.name, child))
            return found

        return _retrying(path, listed)

    def scandir(self, path: str) -> list[Entry]:
        """Return the entries of a directory with their attributes, sorted by name."""
        return _retrying(path, lambda: self._entries(self._fresh_directory(path)))

    def _fresh_directory(self, path: str) -> Directory:
        node = self._lookup(path)
        if isinstance(node, File):
            raise FsError(errno.ENOTDIR, f"not a directory: {path}")
        if self._stale(node):
            node = self._revalidated(node)
        return node

    def _entries(self, node: Directory) -> list[Entry]:
        now = self._mounted_at
        if node.state is None:
            return [Entry(name, _DIR_MODE, 0, now) for name in sorted(self._types)]
        depth = len(node.fixed)
        if node.level is not None:
            level = self._listed(node)
            assert level.values is not None
            if depth < self._file_depth(node.state):
                names = [dimension_dir(level.dimension, v) for v in level.values]
                return sorted((Entry(name, _DIR_MODE, 0, now) for name in names), key=_by_name)
            entries: list[Entry] = []
            for slot in list(level.slots):
                chunk = self._loaded(slot)
                if chunk is None:
                    raise _RetryError
                assert isinstance(chunk, Chunk), "the flat layout's last level is never split"
                entries += self._file_entries(chunk, 0, len(chunk))
            return sorted(entries, key=_by_name)
        chunk = node.chunk
        assert chunk is not None
        if depth < self._file_depth(node.state):
            column = depth - len(chunk.fixed)
            subdirs = chunk.subdirectories(column, node.lo, node.hi)
            return sorted((Entry(name, _DIR_MODE, 0, now) for name, _, _ in subdirs), key=_by_name)
        return sorted(self._file_entries(chunk, node.lo, node.hi), key=_by_name)

    def _file_entries(self, chunk: Chunk, lo: int, hi: int) -> list[Entry]:
        out = []
        sizes = chunk.art_sizes
        for name, art, row in chunk.files(lo, hi):
            size = int(sizes[art])
            if size < 0:
                size = self._unrecorded_size(chunk, art)
            out.append(Entry(name, _FILE_MODE, size, chunk.mtime(row)))
        return out

    def _file_depth(self, state: _TypeState) -> int:
        """Depth of the directories holding files."""
        dims = len(state.info.dimensions)
        return max(dims - 1, 0) if self._layout == "flat" else dims

    def _child(self, node: Directory, name: str) -> Directory | File | None:
        """The child ``name`` of a directory, loading what is needed; `None` if absent."""
        state = node.state
        if state is None:
            found = self._types.get(name)
            return self._type_directory(found) if found is not None else None
        depth = len(node.fixed)
        file_depth = self._file_depth(state)
        if node.level is not None:
            level = node.level
            if depth >= file_depth:
                return self._file_in_level(state, self._listed(node), name)
            try:
                value = parse_dimension_dir(
                    level.dimension, name, as_int=level.dimension in state.info.int_dimensions
                )
            except ValueError:
                return None
            if level.values is None:
                if not _queryable(value):  # no dataset has it; a query would fail, not miss
                    return None
                if value in level.peeks or len(level.peeks) + level.misses < PEEKS_BEFORE_LISTING:
                    return self._peek(state, level, value)
                level = self._listed(node)
                assert level.values is not None
            i = bisect.bisect_left(level.values, value)
            if i == len(level.values) or level.values[i] != value:
                return None
            return self._below(state, level, value)
        chunk = node.chunk
        assert chunk is not None and node.slot is not None
        if depth < file_depth:
            column = depth - len(chunk.fixed)
            dim = state.info.dimensions[depth]
            try:
                value = parse_dimension_dir(dim, name, as_int=dim in state.info.int_dimensions)
            except ValueError:
                return None
            lo, hi = chunk.rows_with(column, node.lo, node.hi, value)
            if lo == hi:
                return None
            return Directory(state, (*node.fixed, (dim, value)), node.slot, None, chunk, lo, hi)
        hit = chunk.find_file(node.lo, node.hi, name)
        return self._file(chunk, *hit) if hit is not None else None

    def _type_directory(self, state: _TypeState) -> Directory:
        node = self._loaded(state.root)
        assert node is not None, "a type's root is never split"
        return _whole(state, (), state.root, node)

    def _below(self, state: _TypeState, level: Level, value: DataIdValue) -> Directory | None:
        """The directory of ``value`` under ``level``, loading its piece."""
        fixed = (*level.fixed, (level.dimension, value))
        assert level.values is not None
        while True:
            slot = level.slot_of(bisect.bisect_left(level.values, value))
            peek = level.peeks.get(value)
            held = peek.node if peek is not None else None  # read once: another thread may drop it
            if peek is not None and held is not None and slot.node is None:
                return _whole(state, fixed, peek, held)
            node = self._loaded(slot, want=value)
            if node is None:
                if level.retired:
                    raise _RetryError
                continue  # the slot was split while loading: look again
            if isinstance(node, Level) or node.fixed == fixed:  # a level, or a lone value's own piece
                return _whole(state, fixed, slot, node)
            lo, hi = node.rows_with(0, 0, len(node), value)
            return Directory(state, fixed, slot, None, node, lo, hi) if lo < hi else None

    def _peek(self, state: _TypeState, level: Level, value: DataIdValue) -> Directory | None:
        """The directory of ``value`` under a level not listed yet: its subtree loaded alone."""
        fixed = (*level.fixed, (level.dimension, value))
        while True:
            with self._lock:
                if level.retired:
                    raise _RetryError
                peek = level.peeks.get(value)
                if peek is None:
                    peek = level.peeks[value] = Slot(state.info.name, fixed, None, level)
            held = self._loaded(peek)
            if held is None:
                if level.retired or peek.retired:
                    raise _RetryError
                continue
            if isinstance(held, Level) or len(held):
                return _whole(state, fixed, peek, held)
            with self._lock:  # no such value: forget the empty piece
                if level.peeks.get(value) is peek:
                    del level.peeks[value]
                    self._retire(peek)
                    level.misses += 1
            return None

    def _listed(self, node: Directory) -> Level:
        """The level of a directory, its values fetched if they were not yet."""
        level = node.level
        assert level is not None and node.state is not None and node.slot is not None
        if level.values is not None:
            return level
        state, slot = node.state, node.slot
        with self._lock:
            if level.values is None and not level.retired:
                started = time.perf_counter()
                values = self._index.distinct(state.info.name, dict(level.fixed), level.dimension)
                _fill_level(level, slot, values, self._subtree_limit)
                if slot.node is level:
                    self._held += level.nbytes - slot.nbytes
                    slot.nbytes = level.nbytes
                    if self._disk is not None and state.token is not None and slot.version == state.version:
                        self._disk.put(slot.key, slot.dataset_type, state.token, _level_bytes(level))
                self._counters["levels_listed"] += 1
                _LOG.debug("Listed %s %s: %d %s values in %.3f s", slot.dataset_type, dict(level.fixed),
                           len(values), level.dimension, time.perf_counter() - started)
        if level.retired:
            raise _RetryError
        return level

    def _file_in_level(self, state: _TypeState, level: Level, name: str) -> File | None:
        """A file of the flat layout in a directory whose last dimension is cut into slots."""
        as_int = level.dimension in state.info.int_dimensions
        values = level.values
        assert values is not None
        for value in candidate_values(name, as_int, lambda v: _has(values, v)):
            node = self._below(state, level, value)
            if node is not None and node.chunk is not None:
                found = node.chunk.find_file(node.lo, node.hi, name)
                if found is not None:
                    return self._file(node.chunk, *found)
        return None

    def _file(self, chunk: Chunk, row: int, art: int) -> File:
        dataset_id = chunk.dataset_id(row)
        arts = []
        mine = None
        for a in range(int(chunk.art_start[row]), int(chunk.art_start[row + 1])):
            store, path, size, component, checksum = chunk.artifact(a)
            artifact = self._index.artifact(dataset_id, store, path, size, component, checksum)
            arts.append(artifact)
            if a == art:
                mine = artifact
        assert mine is not None
        entry = DatasetEntry(
            id=dataset_id,
            dataset_type=chunk.dataset_type,
            run=chunk.run(row),
            data_id=chunk.data_id(row),
            ingest_date=chunk.mtime(row),
            artifacts=tuple(arts),
        )
        size = mine.size if mine.size >= 0 else self._unrecorded_size(chunk, art)
        return File(entry, mine, size)

    def _unrecorded_size(self, chunk: Chunk, art: int) -> int:
        store, path, _, component, _ = chunk.artifact(art)
        row = int(chunk.art_start.searchsorted(art, side="right")) - 1
        key = str(chunk.dataset_id(row)) + (f".{component}" if component else "")
        return self._opener.size(self._index.artifact_uri(chunk.dataset_id(row), store, path, component), key)

    # -- loading, refreshing, evicting ----------------------------------------------------------

    def _stale(self, node: Directory | File) -> bool:
        if not isinstance(node, Directory) or node.slot is None:
            return False
        return self._clock() - node.slot.checked_at > self.refresh

    def _revalidated(self, node: Directory, *, keep_stale: bool = True) -> Directory:
        """Check a stale directory's piece against the registry; return it as now listed.

        With ``keep_stale``, a directory listed before is returned as it was when the
        registry cannot be reached (a listing); else that raises `RegistryUnavailableError`.
        """
        assert node.state is not None and node.slot is not None
        slot = node.slot
        with self._lock:
            if self._clock() - slot.checked_at > self.refresh:
                state = node.state
                try:
                    self._check_state(state, force=True)
                except RegistryUnavailableError:
                    if slot.node is None or not keep_stale:
                        raise
                    # The registry is down: a directory listed before keeps its last listing.
                    return node
                if slot.version == state.version and slot.node is not None:
                    slot.checked_at = self._clock()
                elif slot.node is not None:
                    self._drop(slot)
        # Resolve again from the type's root: the pieces on the way may have been reloaded.
        path = "/" + "/".join([node.state.info.name, *self._names_of(node)])
        found = self._lookup(path)
        if not isinstance(found, Directory):
            raise FsError(errno.ENOTDIR, f"not a directory: {path}")
        return found

    def _names_of(self, node: Directory) -> list[str]:
        return [dimension_dir(dim, value) for dim, value in node.fixed]

    def _check_state(self, state: _TypeState, *, force: bool = False) -> None:
        """Make sure the type's state token is known (and, with ``force``, recent)."""
        if state.token is not None and not (force and self._clock() - state.checked_at > STATE_REUSE):
            return
        name = state.info.name
        stored = self._disk.token(name) if self._disk is not None else None
        previous = state.token or stored
        since = state_since(previous) if previous is not None else None
        started = time.perf_counter()
        token = self._index.state(name, since)
        self._counters["state_checks"] += 1
        _LOG.debug("Checked the state of %s in %.3f s", name, time.perf_counter() - started)
        if previous is not None and token == previous:
            if since is not None and time.time() - since > SINCE_RENEWAL:
                # Unchanged: count recent ingests from now on, so the IDs fetched stay few.
                token = self._index.state(name)
                if self._disk is not None and stored == previous:
                    self._disk.retag(name, previous, token)
                    stored = token
        elif state.token is not None:
            state.version += 1
            _LOG.info("Datasets of %s changed in the collections: listings will be fetched again", name)
        state.token = token
        state.checked_at = self._clock()
        if self._disk is not None and stored != token:
            if stored is not None:
                _LOG.info("The listing index of %s is out of date: fetching its listings again", name)
            self._disk.set_token(name, token)

    def prevalidate(self) -> None:
        """Check every type the on-disk index holds (a remount's first listings then wait less)."""
        if self._disk is None:
            return
        try:
            for state in self._types.values():
                if self._disk.token(state.info.name) is not None:
                    with self._lock:
                        self._check_state(state)
        except Exception as err:  # the first listing of the type checks again, and reports
            _LOG.warning("Checking the listing index failed: %s", err)

    def _loaded(self, slot: Slot, want: DataIdValue | None = None) -> Chunk | Level | None:
        """The piece on ``slot``, loaded if needed; `None` if loading split the slot instead.

        ``want``: the value of the slot's run the caller resolves. `None` is also returned
        when only that value was loaded (`Level.peeks`).
        """
        node = slot.node
        if node is not None:
            if isinstance(node, Chunk):
                try:
                    self._lru.move_to_end(slot)
                except KeyError:  # evicted meanwhile; it stays usable for this request
                    pass
            return node
        with self._lock:
            if slot.node is None and not slot.retired:
                self._load(slot, want)
            return slot.node

    def _load(self, slot: Slot, want: DataIdValue | None = None) -> None:
        """Load the piece of ``slot``: from the on-disk index if it holds it, else the registry."""
        state = self._types[slot.dataset_type]
        self._check_state(state)
        token = state.token
        assert token is not None
        started = time.perf_counter()
        node = self._from_disk(slot, token)
        source = "index"
        if node is None:
            source = "registry"
            node = self._from_registry(state, slot, want)
            if node is None:
                return  # the slot was split, or only ``want`` loaded; the caller resolves again
            if self._disk is not None:
                data = node.to_bytes() if isinstance(node, Chunk) else _level_bytes(node)
                self._disk.put(slot.key, slot.dataset_type, token, data)
            if isinstance(node, Chunk) and len(node) > 1000:
                _trim_heap()
        self._counters[f"loads_{source}"] += 1
        self._attach(slot, node, state.version)
        if isinstance(node, Chunk):
            what = f"{len(node)} datasets"
        else:
            listed = f"{len(node.values)}" if node.values is not None else "(not listed yet)"
            what = f"{listed} {node.dimension} values"
        _LOG.debug(
            "Loaded %s %s%s from the %s: %s in %.3f s",
            slot.dataset_type,
            dict(slot.fixed),
            f" {slot.group[0]} {_span(slot.group[1])}" if slot.group else "",
            source,
            what,
            time.perf_counter() - started,
        )

    def _from_disk(self, slot: Slot, token: str) -> Chunk | Level | None:
        if self._disk is None:
            return None
        data = self._disk.get(slot.key, token)
        if data is None:
            return None
        try:
            if data.startswith(b"{"):
                return _level_from_bytes(slot, data, self._subtree_limit)
            return Chunk.from_bytes(data)
        except ValueError as err:
            _LOG.warning("Discarding a damaged listing in %s: %s", self._disk.path, err)
            self._disk.discard(slot.key)
            return None

    def _from_registry(
        self, state: _TypeState, slot: Slot, want: DataIdValue | None = None
    ) -> Chunk | Level | None:
        info = state.info
        fixed = dict(slot.fixed)
        depth = len(slot.fixed)
        limit = self._subtree_limit
        ingest = self._mtime == "ingest"
        if slot.group is None:
            if depth < len(info.dimensions):
                count = self._count(state, slot)
                if count > limit:
                    return self._new_level(state, slot, count)
            whole = self._index.rows(info.name, fixed, ingest_dates=ingest)
            assert whole is not None
            return Chunk.build(info.name, slot.fixed, whole, listed_at=time.time())
        dim, values = slot.group
        parent = slot.parent
        if (
            want is not None
            and slot.version < 0
            and parent is not None
            and parent.per_value * len(values) > ISOLATE_ABOVE
            and not any(_has(values, v) for v in parent.peeks)  # one value per run
        ):
            peek = parent.peeks[want] = Slot(slot.dataset_type, (*slot.fixed, (dim, want)), None, parent)
            self._load(peek)
            return None
        last = depth + 1 == len(info.dimensions)
        # Expected over the limit (from the level's average), or found over twice the
        # limit: split the run of siblings (or give a lone value its own level) rather
        # than fetch it at once. Flat layout: the last dimension's directory lists all
        # of its files anyway, so it is fetched whole.
        cap = None if last and self._layout == "flat" else 2 * limit
        if cap is not None and parent is not None and parent.per_value * len(values) > limit:
            self._split(slot)  # expected over the limit: spare the query
            return None
        rows = self._index.rows(info.name, fixed, slot.group, ingest_dates=ingest, max_rows=cap)
        if rows is None:
            self._split(slot)
            return None
        return Chunk.build(info.name, slot.fixed, rows, listed_at=time.time())

    def _count(self, state: _TypeState, slot: Slot) -> int:
        """About how many datasets lie under a slot's partial data ID (an upper bound)."""
        if not slot.fixed and not self._index.where and state.token is not None:
            # A type's whole tree: the state check has just counted it, per collection.
            total = state_total(state.token)
            if total is not None:
                return total
        parent = slot.parent
        if parent is not None and not parent.retired and parent.values is not None:
            if len(parent.values) == 1 and slot.fixed[-1] == (parent.dimension, parent.values[0]):
                # The only value (one instrument): its datasets are all the level's.
                return math.ceil(parent.count)
        return self._index.count(state.info.name, dict(slot.fixed))

    def _new_level(self, state: _TypeState, slot: Slot, count: int) -> Level:
        info = state.info
        fixed = slot.fixed
        dim = info.dimensions[len(fixed)]
        level = Level(fixed, dim, None, [], [], count=count)
        if dim in info.governors:  # a few probes: listed at once
            _fill_level(level, slot, self._index.distinct(info.name, dict(fixed), dim), self._subtree_limit)
        return level

    def _split(self, slot: Slot) -> None:
        """Replace an over-full run of siblings by its halves, or a lone value by its own level."""
        parent = slot.parent
        assert parent is not None and slot.group is not None
        dim, values = slot.group
        k = parent.slots.index(slot)
        slot.retired = True
        if len(values) == 1:
            lone = Slot(slot.dataset_type, (*slot.fixed, (dim, values[0])), None, parent)
            replacement = [lone]
        else:
            half = len(values) // 2
            replacement = [
                Slot(slot.dataset_type, slot.fixed, (dim, values[:half]), parent),
                Slot(slot.dataset_type, slot.fixed, (dim, values[half:]), parent),
            ]
        start = parent.starts[k]
        starts = [start] if len(replacement) == 1 else [start, start + len(values) // 2]
        # Readers use starts and slots without the lock: build both, then publish.
        new_starts = parent.starts[:k] + starts + parent.starts[k + 1 :]
        new_slots = parent.slots[:k] + replacement + parent.slots[k + 1 :]
        parent.slots, parent.starts = new_slots, new_starts
        _LOG.debug("Split %s %s %s %s: too many datasets for one query", slot.dataset_type,
                   dict(slot.fixed), dim, _span(values))

    def _attach(self, slot: Slot, node: Chunk | Level, version: int) -> None:
        if slot.node is not None:
            self._drop(slot)
        peeks = slot.parent.peeks if slot.parent is not None else None
        if peeks and slot not in peeks.values():  # a run (or a value's own slot) holds its peeks' values
            if slot.group is not None:
                members = [v for v in peeks if _has(slot.group[1], v)]
            else:
                members = [slot.fixed[-1][1]] if slot.fixed[-1][1] in peeks else []
            for value in members:
                self._retire(peeks.pop(value))
        slot.node = node
        slot.version = version
        slot.checked_at = self._clock()
        slot.nbytes = node.nbytes
        self._held += slot.nbytes
        if isinstance(node, Chunk):
            self._lru[slot] = None
            self._evict(keep=slot)

    def _drop(self, slot: Slot) -> None:
        """Forget a slot's piece (and, for a level, everything below it)."""
        node = slot.node
        if node is None:
            return
        if isinstance(node, Level):
            node.retired = True
            for child in [*node.slots, *node.peeks.values()]:
                self._retire(child)
        self._lru.pop(slot, None)
        self._dirs.clear()  # directories resolved through it (and holding it) are forgotten
        self._held -= slot.nbytes
        slot.node = None
        slot.nbytes = 0

    def _retire(self, slot: Slot) -> None:
        """Drop a slot for good: readers holding it resolve their path again."""
        self._drop(slot)
        slot.retired = True

    def _evict(self, keep: Slot) -> None:
        """Drop the least recently used chunks until the listings fit the memory limit."""
        target = self._memory_limit * 0.9
        if self._held <= self._memory_limit:
            return
        for slot in list(self._lru):
            if self._held <= target:
                break
            if slot is keep:
                continue
            self._drop(slot)
            self._counters["evictions"] += 1

    def memory(self) -> dict[str, int]:
        """Bytes of listings held, the limit, and load, check and eviction counters."""
        return {"listing_bytes": self._held, "listing_limit": self._memory_limit, **self._counters}

    # -- attributes ---------------------------------------------------------------------------

    def getattr(self, path: str) -> Attributes:
        """Return the attributes of the node at ``path``."""
        return self.attributes(self.lookup(path))

    def attributes(self, node: Directory | File) -> Attributes:
        """Return the attributes of a node (as `listdir` gives them)."""
        if isinstance(node, File):
            return Attributes(_FILE_MODE, node.size, node.dataset.ingest_date or self._mounted_at)
        return Attributes(_DIR_MODE, 0, self._mounted_at)

    @property
    def owner(self) -> tuple[int, int]:
        """The uid and gid every node shows: the mounting user's."""
        return self._uid, self._gid

    def xattrs(self, path: str) -> dict[str, bytes]:
        """Return the extended attributes of a file; the root has the mount's counters."""
        node = self.lookup(path)
        if node is self._root:
            stats = {**self._opener.stats(), **self.memory(), **self.runtime}
            return {STATS_XATTR: json.dumps(stats).encode()}
        if isinstance(node, Directory):
            return {}
        dataset = node.dataset
        values = {
            "dataset_id": str(dataset.id),
            "dataset_type": dataset.dataset_type,
            "run": dataset.run,
            "data_id": json.dumps(dict(dataset.data_id)),
            "uri": node.artifact.uri,
        }
        if node.artifact.component:
            values["component"] = node.artifact.component
        return {XATTR_PREFIX + key: value.encode() for key, value in values.items()}

    def statfs(self) -> dict[str, int]:
        """Return ``statvfs`` fields: the datastore's disk, no free space, read-only."""
        blocks = 0
        for root in self._index.datastore_roots():
            path = artifacts.local_path(root)
            if path and os.path.isdir(path):
                st = os.statvfs(path)
                blocks = st.f_blocks * st.f_frsize // 4096
                break
        return {
            "f_bsize": 1 << 20,
            "f_frsize": 4096,
            "f_blocks": blocks,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": 0,
            "f_ffree": 0,
            "f_namemax": 255,
            "f_flag": os.ST_RDONLY | os.ST_NOSUID | os.ST_NODEV,
        }

    # -- reading ------------------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        """Open a file for reading and return a handle.

        Raises
        ------
        FsError
            ``EROFS`` for any write access; ``EISDIR`` for a directory.
        """
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
            raise read_only(path)
        node = self.lookup(path)
        if isinstance(node, Directory):
            raise FsError(errno.EISDIR, f"is a directory: {path}")
        reader = self._opener.open(node.artifact.uri, node.key, node.size, node.artifact.checksum)
        handle = next(self._next_handle)
        self._handles[handle] = reader
        return handle

    def read_into(self, handle: int, buffer: memoryview, offset: int) -> int:
        """Read into ``buffer`` from ``offset``; return the bytes read."""
        reader = self._handles.get(handle)
        if reader is None:
            raise FsError(errno.EBADF, f"bad file handle {handle}")
        return reader.read_into(buffer, offset)

    def read(self, handle: int, size: int, offset: int) -> bytes:
        """Read up to ``size`` bytes from ``offset``."""
        buffer = bytearray(size)
        count = self.read_into(handle, memoryview(buffer), offset)
        return bytes(buffer[:count])

    def release(self, handle: int) -> None:
        """Close a handle."""
        reader = self._handles.pop(handle, None)
        if reader is not None:
            reader.close()

    def close(self) -> None:
        """Close every handle, the on-disk index and the registry connection."""
        for handle in list(self._handles):
            self.release(handle)
        self._opener.close()
        if self._disk is not None:
            self._disk.close()
        self._index.close()


def _fill_level(level: Level, slot: Slot, values: Sequence[DataIdValue], limit: int) -> None:
    """List a level: cut its sorted values into runs of about ``limit`` datasets (assuming even spread)."""
    values = _compact(values)
    per_value = level.count / max(len(values), 1)
    run = max(1, int(limit // max(per_value, 1.0)))
    starts: list[int] = []
    slots: list[Slot] = []
    for start in range(0, len(values), run):
        group = tuple(values[start : start + run])
        starts.append(start)
        slots.append(Slot(slot.dataset_type, slot.fixed, (level.dimension, group), level))
    # Readers use a listed level without the lock: the values come last.
    level.per_value, level.starts, level.slots = per_value, starts, slots
    level.values = values


def _level_bytes(level: Level) -> bytes:
    groups = [[s.group[1] if s.group else None, s.group is None] for s in level.slots]
    return json.dumps(
        {
            "dimension": level.dimension,
            "values": list(level.values) if level.values is not None else None,
            "starts": level.starts,
            "groups": groups,
            "per_value": level.per_value,
            "count": level.count,
        }
    ).encode()


def _level_from_bytes(slot: Slot, data: bytes, limit: int) -> Level:
    try:
        stored = json.loads(data)
        dim = stored["dimension"]
        starts = [int(s) for s in stored["starts"]]
        values = stored["values"]
        per_value = float(stored["per_value"])
        count = float(stored.get("count", per_value * len(values or ())))
        if values is not None:
            values = _compact(values)
        level = Level(slot.fixed, dim, values, starts, [], per_value, count)
        for (group, lone), start in zip(stored["groups"], level.starts, strict=True):
            if lone:
                fixed = (*slot.fixed, (dim, values[start]))
                level.slots.append(Slot(slot.dataset_type, fixed, None, level))
            else:
                level.slots.append(Slot(slot.dataset_type, slot.fixed, (dim, tuple(group)), level))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise ValueError(f"damaged level: {err}") from None
    return level


def _whole(state: _TypeState, fixed: Fixed, slot: Slot, node: Chunk | Level) -> Directory:
    """The directory that is the whole of a slot's piece."""
    if isinstance(node, Level):
        return Directory(state, fixed, slot, node)
    return Directory(state, fixed, slot, None, node, 0, len(node))


def _queryable(value: DataIdValue) -> bool:
    """Whether a registry can compare a dimension column with ``value``.

    A 64-bit integer or a NUL-free string: SQLite refuses larger integers, PostgreSQL NULs.
    """
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return "\x00" not in value


def _compact(values: Sequence[DataIdValue]) -> Sequence[DataIdValue]:
    """Integer values as 8-byte words (a level of 10^6 visits: 8 MB, not 36 MB of Python ints)."""
    ints = [v for v in values if type(v) is int]
    if values and len(ints) == len(values):
        with contextlib.suppress(OverflowError):
            return array.array("q", ints)
    return values if isinstance(values, list) else list(values)


def _values_nbytes(values: Sequence[DataIdValue] | None) -> int:
    if values is None:
        return 0
    if isinstance(values, array.array):
        return values.itemsize * len(values)
    return 80 * len(values)


def _span(values: tuple[DataIdValue, ...] | list[DataIdValue]) -> str:
    return f"{values[0]}..{values[-1]} ({len(values)})" if len(values) > 1 else str(values[0])


def _retrying[T](path: str, resolve: Callable[[], T]) -> T:
    """Call ``resolve`` again when a piece it went through was replaced meanwhile."""
    for _ in range(10):
        try:
            return resolve()
        except _RetryError:
            continue
    raise FsError(errno.EAGAIN, f"the listing of {path} kept changing while it was read")


def _trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc), after a load's temporaries.

    A load of thousands of rows makes many short-lived objects (query rows, UUIDs, astropy
    times); without this the daemon's resident memory keeps their high-water mark.
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _current(node: Directory) -> bool:
    """Whether a remembered directory still shows what its slot holds."""
    slot = node.slot
    if slot is None:
        return True
    held = node.level if node.level is not None else node.chunk
    return slot.node is held and not slot.retired and not (node.level is not None and node.level.retired)


def _has(values: Sequence[DataIdValue], value: DataIdValue) -> bool:
    i = bisect.bisect_left(values, value)
    return i < len(values) and values[i] == value


def _by_name(entry: Entry) -> str:
    return entry.name


def _parts(path: str) -> Iterator[str]:
    return (part for part in path.split("/") if part)
