"""Everything butlerfs asks of a Butler: the one module that imports `lsst.daf.butler`.

The filesystem needs four answers: which dataset types to show, how many datasets
lie under a partial data ID, the distinct values of the next dimension, and the
datasets (with their datastore records) under a partial data ID. No call here reads
an artifact or imports a formatter, so repositories whose storage classes need afw
(``ExposureF``) are served without it.

A Butler is not thread-safe, so every query runs under one lock; FUSE reads never
come here.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from lsst.daf.butler import Butler, CollectionType, DatasetType
from lsst.daf.butler.datastore.stored_file_info import NULLSTR
from lsst.daf.butler.registry import MissingCollectionError
from lsst.resources import ResourcePath

from .errors import UsageError
from .layout import DataIdValue
from .listing import DatasetRows

__all__ = [
    "Artifact",
    "DatasetEntry",
    "DatasetTypeInfo",
    "Group",
    "RepoIndex",
    "check_collections",
    "open_butler",
    "state_since",
]

_LOG = logging.getLogger(__name__)


class Artifact:
    """One file of a dataset as the datastore records it.

    The URI is resolved from the record's path only when first asked for (opening
    the file, reading its xattr): resolving 100,000 of them up front would cost
    seconds of a listing.
    """

    __slots__ = ("_factory", "_uri", "checksum", "component", "formatter", "path", "size")

    def __init__(
        self,
        path: str,
        size: int,
        component: str | None,
        checksum: str | None,
        formatter: str,
        factory: Any = None,
        uri: str | None = None,
    ) -> None:
        self.path = path
        """Path as recorded: relative to the datastore root, or an absolute URI."""
        self.size = size
        """Size in bytes from the datastore record; -1 if the record has none."""
        self.component = component
        """Component name for a disassembled composite."""
        self.checksum = checksum
        self.formatter = formatter
        self._factory = factory
        self._uri = uri

    @property
    def uri(self) -> str:
        """Full URI, with a ``#zip-path=`` fragment for zip members."""
        if self._uri is None:
            self._uri = _resolve(self._factory, self.path)
        return self._uri

    def __repr__(self) -> str:
        return f"Artifact({self.path!r}, size={self.size}, component={self.component!r})"


def _resolve(factory: Any, path: str) -> str:
    """Resolve a record's path as `StoredFileInfo.file_location` does."""
    as_uri = ResourcePath(path, forceAbsolute=False, forceDirectory=False)
    if as_uri.isabs():
        return str(as_uri)
    return str(factory.fromPath(path, trusted_path=True).uri)


@dataclasses.dataclass(frozen=True, slots=True)
class DatasetEntry:
    """A dataset found by a query, with its artifacts."""

    id: uuid.UUID
    dataset_type: str
    run: str
    data_id: tuple[tuple[str, DataIdValue], ...]
    """Required dimensions and their values, in dimension-universe order."""
    ingest_date: float
    """POSIX timestamp of ingest."""
    artifacts: tuple[Artifact, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class DatasetTypeInfo:
    """What the layout needs of a dataset type."""

    name: str
    dimensions: tuple[str, ...]
    """Required dimensions in universe order: one directory level each."""
    int_dimensions: frozenset[str]
    """Dimensions whose values are integers."""
    storage_class: str
    is_calibration: bool


Group = tuple[str, Sequence[DataIdValue]] | None
"""Sibling values of one dimension (``(dimension, sorted values)``) a query is narrowed to."""

INGEST_MARGIN = 600.0
"""Seconds before a state check that an ingest may still be committing with an earlier date.

A Butler stamps ``ingest_date`` with the inserting client's clock when the insert
starts; the check counts datasets ingested since ``INGEST_MARGIN`` before its own time,
so a slow insert or a client clock that lags by less than this is still seen."""

_UNIX_EPOCH_JD = 2440587.5
_TAI_MINUS_UTC = 37.0  # seconds, constant since 2017-01-01, before any Gen3 repository existed


def _as_timestamp(value: Any) -> float:
    """Return a POSIX timestamp for an ingest date (astropy `Time` in TAI, or datetime)."""
    if value is None:
        return 0.0
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.timestamp()
    # Reading the two Julian-date parts directly is ~100x cheaper than Time.unix,
    # which matters for 100,000 datasets per listing.
    internal = getattr(value, "_time", None)
    if getattr(value, "scale", None) == "tai" and internal is not None:
        return (float(internal.jd1) - _UNIX_EPOCH_JD + float(internal.jd2)) * 86400.0 - _TAI_MINUS_UTC
    unix = getattr(value, "unix", None)
    return float(unix if unix is not None else value)


class RepoIndex:
    """Read-only queries of one repository, collection search path and constraint.

    Parameters
    ----------
    repo : `str`
        Repository path, URI or label, as ``butler`` commands take it.
    collections : `~collections.abc.Sequence` [`str`]
        The collection search path; searched find-first, CHAINED collections included.
    dataset_types : `~collections.abc.Sequence` [`str`], optional
        Names or glob patterns; by default every type with datasets in ``collections``.
    where : `str`, optional
        A Butler query expression constraining every listing.

    Raises
    ------
    UsageError
        Raised for a missing repository, unknown collection or dataset type, or a bad
        ``where``: the message says what to fix.
    """

    def __init__(
        self,
        repo: str,
        collections: Sequence[str],
        dataset_types: Sequence[str] = (),
        where: str = "",
    ) -> None:
        self.repo = repo
        self.where = where
        self._lock = threading.Lock()
        self._butler = open_butler(repo)
        self.collections = check_collections(self._butler, repo, collections)
        self._types = _select_dataset_types(self._butler, self.collections, dataset_types)
        self._calibration_collections = self._find_calibration_collections()
        if where:
            self._check_where()

    @property
    def dataset_types(self) -> Mapping[str, DatasetTypeInfo]:
        """The dataset types shown at the top of the mount, by name."""
        return self._types

    def datastore_roots(self) -> list[str]:
        """Return the root URI of each file datastore."""
        return [str(store.root) for store in _file_datastores(self._butler)]

    def count(self, dataset_type: str, fixed: Mapping[str, DataIdValue], group: Group = None) -> int:
        """Return about how many datasets lie under a partial data ID (and ``group``).

        An upper bound is good enough: it only decides whether a directory's
        whole subtree is fetched at once.
        """
        with self._lock, self._butler.query() as query:
            query = query.join_dataset_search(dataset_type, self.collections)
            info = self._types[dataset_type]
            results = _narrow(query.data_ids(info.dimensions).where(fixed, self.where), group)
            return results.count(exact=False)

    def distinct(
        self, dataset_type: str, fixed: Mapping[str, DataIdValue], dimension: str
    ) -> list[DataIdValue]:
        """Return the sorted values of ``dimension`` among the datasets under ``fixed``."""
        with self._lock, self._butler.query() as query:
            query = query.join_dataset_search(dataset_type, self.collections)
            rows = query.data_ids([*fixed, dimension]).where(fixed, self.where)
            return sorted({row[dimension] for row in rows})

    def datasets(self, dataset_type: str, fixed: Mapping[str, DataIdValue]) -> list[DatasetEntry]:
        """Return the datasets under a partial data ID, with their artifacts.

        For a calibration type searched through CALIBRATION collections every
        certified dataset is returned (one data ID may then have several).
        """
        info = self._types[dataset_type]
        find_first = not (info.is_calibration and self._calibration_collections)
        fields: Any = {"dataset_id", "run", "ingest_date"}
        with self._lock, self._butler.query() as query:
            query = query.join_dataset_search(dataset_type, self.collections)
            results = query.general(
                info.dimensions, dataset_fields={dataset_type: fields}, find_first=find_first
            ).where(fixed, self.where)
            rows = list(results)
            ids = [row[f"{dataset_type}.dataset_id"] for row in rows]
            artifacts = self._artifacts(ids)
        seen: set[uuid.UUID] = set()
        entries = []
        for row, dataset_id in zip(rows, ids, strict=True):
            if dataset_id in seen:  # a dataset certified for several validity ranges
                continue
            seen.add(dataset_id)
            entries.append(
                DatasetEntry(
                    id=dataset_id,
                    dataset_type=dataset_type,
                    run=row[f"{dataset_type}.run"],
                    data_id=tuple((dim, row[dim]) for dim in info.dimensions),
                    ingest_date=_as_timestamp(row[f"{dataset_type}.ingest_date"]),
                    artifacts=artifacts.get(dataset_id, ()),
                )
            )
        return entries

    def rows(
        self,
        dataset_type: str,
        fixed: Mapping[str, DataIdValue],
        group: Group = None,
        *,
        ingest_dates: bool = False,
        max_rows: int | None = None,
    ) -> DatasetRows | None:
        """Return the datasets under a partial data ID (and ``group``) as columns.

        Like `datasets`, without an object per dataset. ``ingest_dates`` also fetches each
        dataset's ingest date, which the Butler converts to an astropy ``Time`` per row
        (about as costly as the rest of the query together). With ``max_rows``, `None`
        is returned as soon as more rows than that are found (no records are fetched).
        """
        info = self._types[dataset_type]
        find_first = not (info.is_calibration and self._calibration_collections)
        fields: Any = {"dataset_id", "run", *(["ingest_date"] if ingest_dates else [])}
        id_key, run_key, date_key = (f"{dataset_type}.{f}" for f in ("dataset_id", "run", "ingest_date"))
        dims = info.dimensions
        values: list[list[DataIdValue]] = [[] for _ in dims]
        ids: list[uuid.UUID] = []
        runs: list[str] = []
        dates: list[float] | None = [] if ingest_dates else None
        seen: set[uuid.UUID] = set()
        with self._lock, self._butler.query() as query:
            query = query.join_dataset_search(dataset_type, self.collections)
            results = query.general(dims, dataset_fields={dataset_type: fields}, find_first=find_first)
            results = _narrow(results.where(fixed, self.where), group)
            if max_rows is not None:
                results = results.limit(max_rows + 1)
            for row in results:
                dataset_id = row[id_key]
                if dataset_id in seen:  # a dataset certified for several validity ranges
                    continue
                seen.add(dataset_id)
                ids.append(dataset_id)
                runs.append(row[run_key])
                for column, dim in zip(values, dims, strict=True):
                    column.append(row[dim])
                if dates is not None:
                    dates.append(_as_timestamp(row[date_key]))
            if max_rows is not None and len(ids) > max_rows:
                return None
            found = self._artifacts(ids)
        stores = {id(store.locationFactory): k for k, store in enumerate(_file_datastores(self._butler))}
        artifacts = [
            [(-1 if a._factory is None else stores.get(id(a._factory), -1), a) for a in found.get(i, ())]
            for i in ids
        ]
        return DatasetRows(dims, values, ids, runs, dates, artifacts)

    def artifact(
        self, store: int, path: str, size: int, component: str | None, checksum: str | None
    ) -> Artifact:
        """Return an `Artifact` recorded as ``path`` by file datastore number ``store``."""
        if store < 0:
            return Artifact(path, size, component, checksum, "", uri=path)
        factory = _file_datastores(self._butler)[store].locationFactory
        return Artifact(path, size, component, checksum, "", factory=factory)

    def artifact_uri(self, store: int, path: str) -> str:
        """Return the URI of an artifact recorded as ``path`` by file datastore number ``store``."""
        if store < 0:
            return path
        return _resolve(_file_datastores(self._butler)[store].locationFactory, path)

    def signature(self) -> dict[str, Any]:
        """Return what identifies this mount's query: repository, search path, types, ``where``.

        Two mounts with the same signature show the same datasets whenever the state
        of the collections (`state`) is the same too.
        """
        return {
            "repo": os.path.realpath(self.repo) if os.path.exists(self.repo) else self.repo,
            "datastores": self.datastore_roots(),
            "collections": list(self.collections),
            "where": self.where,
            "dataset_types": {
                name: [list(t.dimensions), t.storage_class, t.is_calibration]
                for name, t in self._types.items()
            },
        }

    def state(self, dataset_type: str, since: float | None = None) -> str:
        """Return a token that changes whenever the datasets of a type in the collections change.

        A collection query and, per collection holding the type, a count and the IDs of
        few datasets; no listing. See docs/SEMANTICS.md for what it detects. Compare
        tokens made with the same ``since`` (the older token's, `state_since`):

        * the search path, CHAINED collections flattened (a redefined chain);
        * per RUN collection: how many datasets of the type it holds (a removal, an
          addition), and a digest of the IDs of those ingested after ``since`` (default:
          `INGEST_MARGIN` seconds ago): a removal together with an addition keeps the
          count, but the new dataset's ingest date is after ``since``;
        * per TAGGED or CALIBRATION collection: a digest of the IDs associated with it
          (associating and certifying never change ingest dates).
        """
        import astropy.time

        if since is None:
            since = round(time.time() - INGEST_MARGIN, 3)
        since_tai = astropy.time.Time(since, format="unix").tai
        id_key = f"{dataset_type}.dataset_id"
        collections: list[list[Any]] = []
        with self._lock:
            infos = self._butler.collections.query_info(
                self.collections, flatten_chains=True, include_summary=True
            )
            for info in infos:
                entry: list[Any] = [info.name, info.type.name]
                collections.append(entry)
                if info.dataset_types is not None and dataset_type not in info.dataset_types:
                    continue
                with self._butler.query() as query:
                    ids = query.join_dataset_search(dataset_type, [info.name]).general(
                        [], dataset_fields={dataset_type: {"dataset_id"}}, find_first=False
                    )
                    if info.type == CollectionType.RUN:
                        entry.append(ids.count(exact=True))
                        ids = ids.where(
                            f"{dataset_type}.ingest_date > butlerfs_since", bind={"butlerfs_since": since_tai}
                        )
                    digest = hashlib.sha1()
                    found = sorted({row[id_key] for row in ids})
                    for dataset_id in found:
                        digest.update(dataset_id.bytes)
                    entry += [len(found), digest.hexdigest()]
        return json.dumps({"since": since, "collections": collections})

    def _artifacts(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[Artifact, ...]]:
        # The datastore's own export reads these rows too, but builds a
        # StoredFileInfo and a ResourcePath per row, which a listing does not need.
        found: dict[uuid.UUID, list[Artifact]] = {}
        for store in _file_datastores(self._butler):
            factory = store.locationFactory
            for batch in store._export_rows(ids):
                for row in batch:
                    found.setdefault(row["dataset_id"], []).append(
                        Artifact(
                            path=row["path"],
                            size=int(row["file_size"]) if row["file_size"] is not None else -1,
                            component=None if row["component"] in (None, "", NULLSTR) else row["component"],
                            checksum=row["checksum"],
                            formatter=row["formatter"],
                            factory=factory,
                        )
                    )
        return {k: tuple(sorted(v, key=lambda a: a.component or "")) for k, v in found.items()}

    def _find_calibration_collections(self) -> list[str]:
        infos = self._butler.collections.query_info(self.collections, flatten_chains=True)
        return [i.name for i in infos if i.type == CollectionType.CALIBRATION]

    def _check_where(self) -> None:
        name = next(iter(self._types), None)
        if name is None:
            return
        try:
            with self._butler.query() as query:
                query = query.join_dataset_search(name, self.collections)
                query.data_ids(self._types[name].dimensions).where(self.where).limit(1).any(execute=True)
        except Exception as err:  # the query system raises several unrelated types for bad syntax
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"invalid --where expression {self.where!r}: {message}") from None

    def close(self) -> None:
        """Release the Butler's database connections."""
        self._butler.close()


def state_since(token: str) -> float | None:
    """The ``since`` a `RepoIndex.state` token was made with (`None` if unreadable)."""
    try:
        return float(json.loads(token)["since"])
    except (ValueError, KeyError, TypeError):
        return None


def _narrow(results: Any, group: Group) -> Any:
    """Constrain query results to one dimension's values in ``group``."""
    if not group:
        return results
    dim, values = group
    if all(type(v) is int for v in values):
        # Sibling values are contiguous in sorted order: a range is one clause, whatever
        # their number. Values added since the siblings were listed fall in it too.
        return results.where(
            f"{dim} >= butlerfs_lo AND {dim} <= butlerfs_hi",
            bind={"butlerfs_lo": min(values), "butlerfs_hi": max(values)},
        )
    return results.where(f"{dim} IN (butlerfs_values)", bind={"butlerfs_values": list(values)})


def open_butler(repo: str, *, writeable: bool = False) -> Butler:
    """Open a repository, turning the Butler's errors into one line.

    Raises
    ------
    UsageError
        Raised if ``repo`` is not a Butler repository.
    """
    try:
        return Butler.from_config(repo, writeable=writeable)
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as err:
        first = str(err).split(" (given", 1)[0]
        raise UsageError(
            f"{repo} is not a Butler repository ({first}): give the directory holding butler.yaml"
        ) from None


def check_collections(butler: Butler, repo: str, collections: Sequence[str]) -> tuple[str, ...]:
    """Check that collections are given, are not patterns, and exist.

    Raises
    ------
    UsageError
        Saying which collection is wrong and how to list the others.
    """
    if not collections:
        chains = sorted(
            info.name for info in butler.collections.query_info("*") if info.type == CollectionType.CHAINED
        )
        hint = f" (chained collections here: {', '.join(chains[:5])})" if chains else ""
        raise UsageError(f"no collections given: pass --collections{hint}")
    for name in collections:
        if any(ch in name for ch in "*?["):
            raise UsageError(
                f"collection {name!r} is a pattern; the mount searches collections in order, "
                "so name each one (see `butler query-collections`)"
            )
        try:
            butler.collections.get_info(name)
        except MissingCollectionError:
            raise UsageError(
                f"unknown collection {name!r}: list them with `butler query-collections {repo}`"
            ) from None
    return tuple(collections)


def _select_dataset_types(
    butler: Butler, collections: Sequence[str], patterns: Sequence[str]
) -> dict[str, DatasetTypeInfo]:
    registered = {dt.name: dt for dt in butler.registry.queryDatasetTypes("*") if not dt.isComponent()}
    if patterns:
        chosen: set[str] = set()
        for pattern in patterns:
            matches = fnmatch.filter(registered, pattern)
            if not matches:
                raise UsageError(
                    f"unknown dataset type {pattern!r}: list them with `butler query-dataset-types`"
                )
            chosen.update(matches)
    else:
        chosen = set()
        for info in butler.collections.query_info(collections, include_summary=True, flatten_chains=True):
            chosen.update(info.dataset_types or ())
        chosen &= set(registered)
    return {name: _type_info(registered[name]) for name in sorted(chosen)}


def _type_info(dataset_type: DatasetType) -> DatasetTypeInfo:
    dims = dataset_type.dimensions
    universe = dims.universe
    ints = frozenset(
        name for name in dims.required if universe.dimensions[name].primaryKey.getPythonType() is int
    )
    return DatasetTypeInfo(
        name=dataset_type.name,
        dimensions=tuple(dims.required),
        int_dimensions=ints,
        storage_class=dataset_type.storageClass_name,
        is_calibration=dataset_type.isCalibration(),
    )


def _file_datastores(butler: Butler) -> list[Any]:
    datastore = butler._datastore
    return [s for s in getattr(datastore, "datastores", [datastore]) if hasattr(s, "locationFactory")]
