"""The filesystem's meaning, independent of FUSE.

`ButlerSource` resolves paths to directories and files, lists directories lazily
from the registry, gives attributes and extended attributes, and reads artifacts.
The FUSE adapter calls it and nothing else, so all of this is testable without a
kernel. Paths are POSIX strings rooted at ``/``.

Listing strategy: a directory is loaded when first listed or looked into. If the
registry holds few enough datasets under it (``subtree_limit``), the datasets and
their datastore records are fetched in one query and the whole subtree is built
at once; otherwise only the next dimension's distinct values are fetched. A loaded
directory is reloaded when listed, or when a name is missing from it, after
``refresh`` seconds, so datasets added later appear. Datasets are immutable per
UUID, so a file once seen keeps its attributes.
"""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from . import artifacts
from .errors import FsError, not_found, read_only
from .layout import DataIdValue, dimension_dir, file_name
from .registry import Artifact, DatasetEntry, DatasetTypeInfo, RegistryUnavailableError, RepoIndex

__all__ = ["Attributes", "ButlerSource", "Directory", "File"]

_LOG = logging.getLogger(__name__)

XATTR_PREFIX = "user.butler."
STATS_XATTR = "user.butlerfs.stats"


@dataclass(slots=True)
class Directory:
    """A directory: the root, a dataset type, or one dimension value below it."""

    dataset_type: DatasetTypeInfo | None
    fixed: tuple[tuple[str, DataIdValue], ...] = ()
    children: dict[str, Directory | File] | None = None
    loaded_at: float = -1.0

    @property
    def next_dimension(self) -> str | None:
        """The dimension its subdirectories name, or `None` for a leaf."""
        assert self.dataset_type is not None
        dims = self.dataset_type.dimensions
        return dims[len(self.fixed)] if len(self.fixed) < len(dims) else None


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


@dataclass(frozen=True, slots=True)
class Attributes:
    """What ``stat`` shows; the FUSE adapter turns it into a ``struct stat``."""

    mode: int
    size: int
    mtime: float
    nlink: int = 1
    extra: Mapping[str, int] = field(default_factory=dict)


class ButlerSource:
    """Paths, listings, attributes and reads of a mounted repository.

    Parameters
    ----------
    index : `RepoIndex`
        The registry queries.
    refresh : `float`, optional
        Seconds a listing is trusted before it is queried again.
    subtree_limit : `int`, optional
        Largest number of datasets fetched in one go to build a whole subtree.
    opener : `~butlerfs.artifacts.ArtifactOpener`, optional
        Opens artifacts; the default reads POSIX artifacts only.
    clock : callable, optional
        Monotonic clock, replaceable in tests.
    """

    def __init__(
        self,
        index: RepoIndex,
        *,
        refresh: float = 60.0,
        subtree_limit: int = 20_000,
        opener: artifacts.ArtifactOpener | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._index = index
        self._opener = opener or artifacts.ArtifactOpener()
        self.refresh = refresh
        self._subtree_limit = subtree_limit
        self._clock = clock
        self._load_lock = threading.Lock()
        self._handles: dict[int, artifacts.Reader] = {}
        self._next_handle = itertools.count(1)
        self._mounted_at = time.time()
        self._uid, self._gid = os.getuid(), os.getgid()
        self.runtime: dict[str, str] = {}
        """Facts about the serving process shown in the stats attribute (``libfuse``)."""
        self._root = Directory(
            None,
            children={name: Directory(info) for name, info in index.dataset_types.items()},
            loaded_at=float("inf"),
        )

    # Resolution and listing

    def lookup(self, path: str) -> Directory | File:
        """Return the node at ``path``.

        Raises
        ------
        FsError
            ``ENOENT`` if nothing is there; ``ENOTDIR`` if a file is used as a directory.
        """
        node: Directory | File = self._root
        for name in _split(path):
            if isinstance(node, File):
                raise FsError(errno.ENOTDIR, f"not a directory: {path}")
            children = self._children(node)
            child = children.get(name)
            if child is None and self._stale(node):
                child = self._children(node, reload=True).get(name)
            if child is None:
                raise not_found(path)
            node = child
        return node

    def listdir(self, path: str) -> list[tuple[str, Directory | File]]:
        """Return the entries of a directory, sorted by name."""
        node = self.lookup(path)
        if isinstance(node, File):
            raise FsError(errno.ENOTDIR, f"not a directory: {path}")
        try:
            children = self._children(node, reload=self._stale(node))
        except RegistryUnavailableError:
            if node.children is None:
                raise
            # The registry is down: a directory listed before keeps its last listing.
            children = node.children
        return sorted(children.items())

    def _stale(self, node: Directory) -> bool:
        return self._clock() - node.loaded_at > self.refresh

    def _children(self, node: Directory, *, reload: bool = False) -> dict[str, Directory | File]:
        children = node.children
        if children is not None and not reload:
            return children
        with self._load_lock:
            # Another thread may have loaded it while we waited.
            if node.children is not None and (not reload or not self._stale(node)):
                return node.children
            self._load(node)
        assert node.children is not None
        return node.children

    def _load(self, node: Directory) -> None:
        info = node.dataset_type
        assert info is not None, "the root is static"
        fixed = dict(node.fixed)
        dimension = node.next_dimension
        started = time.perf_counter()
        if dimension is None or self._index.count(info.name, fixed) <= self._subtree_limit:
            entries = self._index.datasets(info.name, fixed)
            self._build_subtree(node, entries)
            what = f"{len(entries)} datasets"
        else:
            old = node.children or {}
            children: dict[str, Directory | File] = {}
            for value in self._index.distinct(info.name, fixed, dimension):
                name = dimension_dir(dimension, value)
                kept = old.get(name)
                children[name] = (
                    kept if kept is not None else Directory(info, (*node.fixed, (dimension, value)))
                )
            node.children = children
            node.loaded_at = self._clock()
            what = f"{len(children)} {dimension} values"
        _LOG.debug("Loaded %s %s: %s in %.3f s", info.name, fixed, what, time.perf_counter() - started)

    def _build_subtree(self, node: Directory, entries: list[DatasetEntry]) -> None:
        assert node.dataset_type is not None
        now = self._clock()
        info = node.dataset_type
        depth = len(node.fixed)
        fresh: dict[tuple[tuple[str, DataIdValue], ...], Directory] = {}

        def directory(fixed: tuple[tuple[str, DataIdValue], ...]) -> Directory:
            found = fresh.get(fixed)
            if found is None:
                found = fresh[fixed] = Directory(info, fixed, children={}, loaded_at=now)
                if len(fixed) > depth:
                    parent = directory(fixed[:-1])
                    dim, value = fixed[-1]
                    assert parent.children is not None
                    parent.children[dimension_dir(dim, value)] = found
            return found

        directory(node.fixed)
        by_data_id: dict[tuple[tuple[str, DataIdValue], ...], list[DatasetEntry]] = {}
        for entry in entries:
            by_data_id.setdefault(entry.data_id, []).append(entry)
        for data_id, same in by_data_id.items():
            leaf = directory(data_id)
            assert leaf.children is not None
            for entry in same:
                for name, file in self._files_of(entry, info, disambiguate=len(same) > 1):
                    leaf.children[name] = file
        top = fresh[node.fixed]
        node.children = top.children
        node.loaded_at = now

    def _files_of(
        self, entry: DatasetEntry, info: DatasetTypeInfo, *, disambiguate: bool
    ) -> Iterator[tuple[str, File]]:
        values = [value for _, value in entry.data_id]
        for artifact in entry.artifacts:
            ext = artifacts.extension_of(artifact.path)
            name = file_name(info.name, values, ext, artifact.component)
            if disambiguate:
                # Several datasets share this data ID (calibrations certified for several
                # validity ranges): the UUID prefix keeps their names apart.
                stem = name[: len(name) - len(ext)] if ext else name
                name = f"{stem}-{entry.id.hex[:8]}{ext}"
            file = File(entry, artifact, artifact.size)
            if artifact.size < 0:
                file = File(entry, artifact, self._opener.size(artifact.uri, file.key))
            yield name, file

    # Attributes

    def getattr(self, path: str) -> Attributes:
        """Return the attributes of the node at ``path``."""
        return self.attributes(self.lookup(path))

    def attributes(self, node: Directory | File) -> Attributes:
        """Return the attributes of a node (as `listdir` gives them)."""
        if isinstance(node, File):
            return Attributes(stat.S_IFREG | 0o644, node.size, node.dataset.ingest_date or self._mounted_at)
        return Attributes(stat.S_IFDIR | 0o755, 0, self._mounted_at)

    @property
    def owner(self) -> tuple[int, int]:
        """The uid and gid every node shows: the mounting user's."""
        return self._uid, self._gid

    def xattrs(self, path: str) -> dict[str, bytes]:
        """Return the extended attributes of a file; the root has the mount's counters."""
        node = self.lookup(path)
        if node is self._root:
            return {STATS_XATTR: json.dumps({**self._opener.stats(), **self.runtime}).encode()}
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

    # Reading

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
        """Close every handle and the registry connection."""
        for handle in list(self._handles):
            self.release(handle)
        self._opener.close()
        self._index.close()


def _split(path: str) -> Iterator[str]:
    return (part for part in path.split("/") if part)
