"""Fill the block cache for a query, so that a batch run afterwards reads locally."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

from .artifacts import ArtifactOpener, local_path
from .fetch import RemoteReader
from .mounting import MountOptions, make_opener
from .registry import RepoIndex
from .source import File

__all__ = ["PrefetchResult", "prefetch"]

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass
class PrefetchResult:
    """What a prefetch did."""

    datasets: int = 0
    remote_artifacts: int = 0
    local_artifacts: int = 0
    bytes_total: int = 0
    bytes_fetched: int = 0
    requests: int = 0


def prefetch(
    options: MountOptions,
    *,
    on_plan: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    window: int = 64,
) -> PrefetchResult:
    """Fetch every remote artifact that ``options`` would show into the cache.

    Parameters
    ----------
    options : `MountOptions`
        Repository, collections, dataset types, where, cache directory and size,
        fetch concurrency (the mount point is not used).
    on_plan : callable, optional
        Called once with the total bytes of remote artifacts.
    on_progress : callable, optional
        Called with the bytes of each artifact once it is cached.
    window : `int`, optional
        Artifacts fetched at once (their parts share the fetch concurrency).

    Returns
    -------
    result : `PrefetchResult`
        Counts, and the bytes actually fetched (cached blocks are not fetched again).
    """
    index = RepoIndex(options.repo, options.collections, options.dataset_types, options.where)
    opener = make_opener(options, index.datastore)
    result = PrefetchResult()
    try:
        files: list[File] = []
        for name in index.dataset_types:
            for entry in index.datasets(name, {}):
                result.datasets += 1
                files.extend(File(entry, artifact, artifact.size) for artifact in entry.artifacts)
        remote = [f for f in files if local_path(f.artifact.uri) is None]
        result.local_artifacts = len(files) - len(remote)
        result.remote_artifacts = len(remote)
        result.bytes_total = sum(max(f.size, 0) for f in remote)
        if on_plan is not None:
            on_plan(result.bytes_total)
        for start in range(0, len(remote), window):
            _fetch_batch(opener, remote[start : start + window], on_progress)
        stats = opener.stats()
        result.bytes_fetched = stats.get("bytes_fetched", 0)
        result.requests = stats.get("requests", 0)
    finally:
        opener.close()
        index.close()
    return result


def _fetch_batch(
    opener: ArtifactOpener, files: Sequence[File], on_progress: Callable[[int], None] | None
) -> None:
    readers = []
    for f in files:
        reader = opener.open(f.artifact.uri, f.key, f.size, f.artifact.checksum)
        if isinstance(reader, RemoteReader):
            # Ask for every block of the batch first, so that the parts of all its
            # artifacts fill the fetch pool together.
            opener.fetcher().request(reader.obj, 0, reader.obj.blocks - 1)
        readers.append((f, reader))
    for f, reader in readers:
        try:
            if isinstance(reader, RemoteReader):
                opener.fetcher().fetch_all(reader.obj)
        finally:
            reader.close()
        if on_progress is not None:
            on_progress(max(f.size, 0))
