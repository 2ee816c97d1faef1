"""Everything butlerfs asks of a Butler's registry, through its public query API.

The filesystem needs four answers: which dataset types to show, how many datasets
lie under a partial data ID, the distinct values of the next dimension, and the
datasets (with their datastore records) under a partial data ID. No call here reads
an artifact or imports a formatter, so repositories whose storage classes need afw
(``ExposureF``) are served without it. The queries work alike on a direct Butler and
on a client/server one; the datastore records come from `butlerfs.datastore`, the
one place that tells the two apart.

A Butler is not thread-safe, so every query runs under one lock; FUSE reads never
come here.

Registry faults are translated here, once: a database (or Butler server) that cannot be
reached (or refuses the credentials) is a one-line `UsageError` when the repository is
opened, and a `RegistryUnavailableError` (``EIO``) for a query of a mounted repository, with
one warning per outage in the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fnmatch
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy.engine
import sqlalchemy.exc
from lsst.daf.butler import Butler, ButlerConfig, CollectionType, DatasetType
from lsst.daf.butler.registry import MissingCollectionError

from .datastore import Artifact, Datastore, datastore_for
from .errors import FsError, UsageError
from .layout import DataIdValue
from .listing import DatasetRows
from .registry_direct import tags_table

__all__ = [
    "Artifact",
    "DatasetEntry",
    "DatasetTypeInfo",
    "Group",
    "RegistryUnavailableError",
    "RepoIndex",
    "check_collections",
    "database_errors",
    "database_location",
    "open_butler",
    "registry_location",
    "state_since",
    "state_total",
]

_LOG = logging.getLogger(__name__)


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
    governors: frozenset[str] = frozenset()
    """Dimensions among ``dimensions`` whose values a registry holds few of (``instrument``)."""


Group = tuple[str, Sequence[DataIdValue]] | None
"""Sibling values of one dimension (``(dimension, sorted values)``) a query is narrowed to."""

INGEST_MARGIN = 600.0
"""Seconds before a state check that an ingest may still be committing with an earlier date.

A Butler stamps ``ingest_date`` with the inserting client's clock when the insert
starts; the check counts datasets ingested since ``INGEST_MARGIN`` before its own time,
so a slow insert or a client clock that lags by less than this is still seen."""

_GOVERNOR_PROBES = 32
"""Most values of a governor dimension probed one by one; a registry with more is scanned."""

_UNIX_EPOCH_JD = 2440587.5
_TAI_MINUS_UTC = 37.0  # seconds, constant since 2017-01-01, before any Gen3 repository existed


def _as_timestamp(value: Any) -> float:
    """Return a POSIX timestamp for an ingest date (astropy `Time` in TAI, or datetime).

    Also as stored: an integer (nanoseconds TAI since 1970) or a datetime.
    """
    if value is None:
        return 0.0
    if isinstance(value, int):
        return value / 1e9 - _TAI_MINUS_UTC
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
        Raised for a missing repository, an unreachable registry, an unknown collection
        or dataset type, or a bad ``where``: the message says what to fix.

    Notes
    -----
    Once open, a query whose database does not answer raises `RegistryUnavailableError`
    (``EIO``); the first of an outage logs one warning, the first success after it
    one info line. The Butler's connection pool reconnects by itself.
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
        self.datastore: Datastore = datastore_for(self._butler)
        """The records and artifact URIs of the repository's datastore."""
        self._tags = tags_table(self._butler)  # None for a Butler server
        self._location = ""  # for messages; read from the configuration at the first fault
        self._down_since: float | None = None
        with _opening(repo):
            self.collections = check_collections(self._butler, repo, collections)
            self._types = _select_dataset_types(self._butler, self.collections, dataset_types)
            self._calibration_collections = self._find_calibration_collections()
            if where:
                self._check_where()
            self.datastore.check(self._sample_ids)

    @property
    def dataset_types(self) -> Mapping[str, DatasetTypeInfo]:
        """The dataset types shown at the top of the mount, by name."""
        return self._types

    def datastore_roots(self) -> list[str]:
        """Return where artifacts come from: datastore roots, or a Butler server's URL."""
        return self.datastore.roots()

    def count(self, dataset_type: str, fixed: Mapping[str, DataIdValue], group: Group = None) -> int:
        """Return about how many datasets lie under a partial data ID (and ``group``).

        An upper bound is good enough: it only decides whether a directory's
        whole subtree is fetched at once.
        """
        with self._query() as butler, butler.query() as query:
            query = query.join_dataset_search(dataset_type, self.collections)
            info = self._types[dataset_type]
            results = _narrow(query.data_ids(info.dimensions).where(fixed, self.where), group)
            return results.count(exact=False)

    def distinct(
        self, dataset_type: str, fixed: Mapping[str, DataIdValue], dimension: str
    ) -> list[DataIdValue]:
        """Return the sorted values of ``dimension`` among the datasets under ``fixed``.

        A direct Butler's are read from its tags table (`butlerfs.registry_direct`) unless
        a ``where`` constrains the mount. Through the query system, a governor dimension's
        values (``instrument``, ``skymap``) are the registry's few, each kept if a dataset
        has it: one indexed probe each, where the distinct values of a large collection
        are a scan of all of its datasets (0.5 s for 10^6 on PostgreSQL).
        """
        info = self._types[dataset_type]
        with self._query() as butler:
            if self._tags is not None and not self.where:
                values = self._tags.distinct(dataset_type, self.collections, fixed, dimension)
                if values is not None:
                    return values
            if dimension in info.governors:
                with butler.query() as query:
                    candidates = sorted({row[dimension] for row in query.data_ids([dimension])})
                if len(candidates) <= _GOVERNOR_PROBES:
                    return [v for v in candidates if self._has(butler, info, {**fixed, dimension: v})]
            with butler.query() as query:
                query = query.join_dataset_search(dataset_type, self.collections)
                rows = query.data_ids([*fixed, dimension]).where(fixed, self.where)
                return sorted({row[dimension] for row in rows})

    def _has(self, butler: Butler, info: DatasetTypeInfo, fixed: Mapping[str, DataIdValue]) -> bool:
        """Whether a dataset of the type lies under a partial data ID."""
        with butler.query() as query:
            query = query.join_dataset_search(info.name, self.collections)
            return query.data_ids(info.dimensions).where(fixed, self.where).any(execute=True, exact=True)

    def datasets(self, dataset_type: str, fixed: Mapping[str, DataIdValue]) -> list[DatasetEntry]:
        """Return the datasets under a partial data ID, with their artifacts.

        For a calibration type searched through CALIBRATION collections every
        certified dataset is returned (one data ID may then have several).
        """
        info = self._types[dataset_type]
        find_first = not (info.is_calibration and self._calibration_collections)
        fields: Any = {"dataset_id", "run", "ingest_date"}
        with self._query() as butler, butler.query() as query:
            query = query.join_dataset_search(dataset_type, self.collections)
            results = query.general(
                info.dimensions, dataset_fields={dataset_type: fields}, find_first=find_first
            ).where(fixed, self.where)
            rows = list(results)
            ids = [row[f"{dataset_type}.dataset_id"] for row in rows]
            artifacts = self.datastore.artifacts(ids)
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

    @contextlib.contextmanager
    def _query(self) -> Iterator[Butler]:
        """Hold the Butler for one query; turn a database that does not answer into ``EIO``."""
        with self._lock:
            try:
                yield self._butler
            except Exception as err:
                reason = self._unavailable(err)
                if reason is None:
                    raise
                self._location = self._location or registry_location(self.repo)
                message = f"cannot reach the registry at {self._location}: {reason}"
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    _LOG.warning("%s; listings that need it fail with EIO until it answers", message)
                else:
                    _LOG.debug("%s", message)
                raise RegistryUnavailableError(message) from None
            if self._down_since is not None:
                _LOG.info(
                    "The registry at %s answers again, after %.0f s",
                    self._location,
                    time.monotonic() - self._down_since,
                )
                self._down_since = None

    def _unavailable(self, err: Exception) -> str | None:
        """Return why the registry cannot be used now, or `None` for any other error."""
        if isinstance(err, sqlalchemy.exc.DBAPIError):
            return _reason(err) if _is_unreachable(err) else None
        return self.datastore.unavailable(err)

    def _sample_ids(self) -> list[uuid.UUID]:
        """Return the ID of one dataset shown, if any (for `Datastore.check`)."""
        with self._butler.query() as query:
            for name in self._types:
                for ref in query.datasets(name, self.collections).limit(1):
                    return [ref.id]
        return []

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

        Like `datasets`, without an object per dataset. A direct Butler's are read from
        its tags table (`butlerfs.registry_direct`) unless a ``where`` constrains the mount
        or a calibration type is searched in CALIBRATION collections. ``ingest_dates`` also fetches each
        dataset's ingest date: as stored, from the tags query or with the records if the
        datastore `reads_ingest_dates`; otherwise from the Butler's query, which makes an
        astropy ``Time`` of each (about as costly as the rest of the query together). With
        ``max_rows``, `None` is returned as soon as more rows than that are found (no
        records are fetched).
        """
        info = self._types[dataset_type]
        find_first = not (info.is_calibration and self._calibration_collections)
        dims = info.dimensions
        with self._query() as butler:
            answer = None
            if self._tags is not None and find_first and not self.where:
                answer = self._tags.rows(
                    dataset_type, self.collections, dims, fixed, group, dates=ingest_dates, max_rows=max_rows
                )
            selection: Any = None
            ids: list[uuid.UUID]
            dates: list[float] | None
            if answer is not None:
                found_rows, selection = answer
                ids = [row[0] for row in found_rows]
                runs = [row[1] for row in found_rows]
                dates = [_as_timestamp(row[2]) for row in found_rows] if ingest_dates else None
                values = [[row[3 + k] for row in found_rows] for k in range(len(dims))]
                dated_records = False
            else:
                # A direct Butler's datastore reads the dates with the records, cheaper than the query.
                dated_records = ingest_dates and self.datastore.reads_ingest_dates
                ids, runs, dates, values = self._query_rows(
                    butler, info, fixed, group, find_first, ingest_dates and not dated_records, max_rows
                )
            if max_rows is not None and len(ids) > max_rows:
                return None
            if dated_records:
                found, stored = self.datastore.artifacts_and_ingest_dates(ids)
                dates = [_as_timestamp(stored.get(i)) for i in ids]
            elif selection is not None and ids:
                found = self.datastore.artifacts_selected(selection)
            else:
                found = self.datastore.artifacts(ids)
        artifacts = [[(a.store, a) for a in found.get(i, ())] for i in ids]
        return DatasetRows(dims, values, ids, runs, dates, artifacts)

    def _query_rows(
        self,
        butler: Butler,
        info: DatasetTypeInfo,
        fixed: Mapping[str, DataIdValue],
        group: Group,
        find_first: bool,
        dated: bool,
        max_rows: int | None,
    ) -> tuple[list[uuid.UUID], list[str], list[float] | None, list[list[DataIdValue]]]:
        """`rows` asked of the Butler's query system: IDs, runs, dates if ``dated``, data ID columns."""
        dataset_type = info.name
        fields: Any = {"dataset_id", "run", *(["ingest_date"] if dated else [])}
        id_key, run_key, date_key = (f"{dataset_type}.{f}" for f in ("dataset_id", "run", "ingest_date"))
        dims = info.dimensions
        values: list[list[DataIdValue]] = [[] for _ in dims]
        ids: list[uuid.UUID] = []
        runs: list[str] = []
        dates: list[float] | None = [] if dated else None
        seen: set[uuid.UUID] = set()
        with butler.query() as query:
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
        return ids, runs, dates, values

    def artifact(
        self,
        dataset_id: uuid.UUID,
        store: int,
        path: str,
        size: int,
        component: str | None,
        checksum: str | None,
    ) -> Artifact:
        """Return an `Artifact` of a dataset recorded as ``path`` (`Artifact.store` ``store``)."""
        return self.datastore.artifact(dataset_id, store, path, size, component, checksum)

    def artifact_uri(self, dataset_id: uuid.UUID, store: int, path: str, component: str | None) -> str:
        """Return the URI of an artifact of a dataset recorded as ``path`` (`Artifact.store` ``store``)."""
        return self.artifact(dataset_id, store, path, -1, component, None).uri

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
        with self._query() as butler:
            infos = butler.collections.query_info(
                self.collections, flatten_chains=True, include_summary=True
            )
            for info in infos:
                entry: list[Any] = [info.name, info.type.name]
                collections.append(entry)
                if info.dataset_types is not None and dataset_type not in info.dataset_types:
                    continue
                with butler.query() as query:
                    ids = query.join_dataset_search(dataset_type, [info.name]).general(
                        [], dataset_fields={dataset_type: {"dataset_id"}}, find_first=False
                    )
                    if info.type == CollectionType.RUN:
                        count = None if self._tags is None else self._tags.count(dataset_type, info.name)
                        entry.append(ids.count(exact=True) if count is None else count)
                        ids = ids.where(
                            f"{dataset_type}.ingest_date > butlerfs_since", bind={"butlerfs_since": since_tai}
                        )
                    digest = hashlib.sha1()
                    found = sorted({row[id_key] for row in ids})
                    for dataset_id in found:
                        digest.update(dataset_id.bytes)
                    entry += [len(found), digest.hexdigest()]
        return json.dumps({"since": since, "collections": collections})

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
        except sqlalchemy.exc.DBAPIError:
            raise  # the database, not the expression
        except Exception as err:  # the query system raises several unrelated types for bad syntax
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"invalid --where expression {self.where!r}: {message}") from None

    def close(self) -> None:
        """Release the Butler's database connections."""
        self._butler.close()


def state_total(token: str) -> int | None:
    """How many datasets a `RepoIndex.state` token counted in its collections (`None` if unreadable).

    An upper bound of what a listing of the type finds: a dataset hidden by an earlier
    collection of the search path is counted too, and so is one a ``where`` leaves out.
    """
    try:
        return sum(int(entry[2]) for entry in json.loads(token)["collections"] if len(entry) > 2)
    except (ValueError, KeyError, TypeError, IndexError):
        return None


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
    """Open a repository (path, URI, Butler server URL or label), turning errors into one line.

    Raises
    ------
    UsageError
        Raised if ``repo`` is not a Butler repository, its registry database cannot be
        reached or refuses the credentials, or a Butler server cannot be used: no token,
        the ``remote`` extra missing, an unknown repository name, no answer.
    """
    # libpq waits for ever for a server that does not answer; a user's own setting wins.
    os.environ.setdefault("PGCONNECT_TIMEOUT", "10")
    try:
        with _opening(repo), _quiet_butler_failure():
            return Butler.from_config(repo, writeable=writeable)
    except UsageError:
        raise
    except ImportError as err:
        if (err.name or "").split(".")[0] not in _REMOTE_MODULES:
            raise
        raise UsageError(
            f"{repo} is a client/server Butler, which needs the remote extra ({err.name or err} is "
            "missing): pip install 'butlerfs[remote]'"
        ) from None
    except Exception as err:
        message = _server_problem(repo, err)
        if message is not None:
            raise UsageError(message) from None
        if not isinstance(err, (FileNotFoundError, RuntimeError, ValueError, KeyError)):
            raise
        first = str(err).split(" (given", 1)[0]
        raise UsageError(
            f"{repo} is not a Butler repository ({first}): give the directory holding butler.yaml"
        ) from None


_REMOTE_MODULES = ("httpx2", "httpcore2")
"""What only a client/server Butler imports (daf_butler's ``remote`` extra)."""


def _server_problem(repo: str, err: Exception) -> str | None:
    """Return the one-line reason a Butler server cannot be used, or `None` for other errors."""
    text = str(err)
    if isinstance(err, RuntimeError) and "no access credentials" in text:
        return (
            f"{repo} is a client/server Butler and no access token was found: set "
            "BUTLER_RUBIN_ACCESS_TOKEN to your Rubin Science Platform token"
        )
    if type(err).__name__ == "ButlerServerError":
        status = getattr(err, "status_code", None)
        if status is None:
            cause = err.__cause__
            return f"cannot reach the Butler server of {repo}: {cause or text} (check the URL, the network)"
        return (
            f"the Butler server of {repo} failed (HTTP {status}) when asked for the repository: check the "
            "repository name at the end of the URL (the server serves no repository of that name) "
            "or ask its administrator"
        )
    if isinstance(err, ConnectionError) or type(err).__name__ in ("ConnectionError", "ConnectTimeout"):
        # lsst.resources reads a server's butler.yaml with requests.
        reason = _innermost(text)
        return f"cannot reach the Butler server of {repo}: {reason} (check the URL and the network)"
    return None


def _innermost(text: str) -> str:
    """The system's reason inside a requests/urllib3 error (``[Errno 111] Connection refused``)."""
    found = _ERRNO.search(text)
    if found:
        return found.group(0).strip()
    return text.splitlines()[0][:200] if text.strip() else "no answer"


_ERRNO = re.compile(r"\[Errno -?\d+\][^'\")]+")


class RegistryUnavailableError(FsError):
    """A query of an open repository failed because its registry database did not answer.

    It carries ``EIO``: the FUSE boundary returns that for the listing or lookup that needed
    the query.
    """

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


def registry_location(repo: str) -> str:
    """Return where the registry database of ``repo`` is: ``HOST:PORT``, or ``repo`` itself.

    For messages only: any failure to read the configuration gives ``repo``.
    """
    try:
        db = str(ButlerConfig(repo)["registry", "db"])
    except Exception:
        return repo
    return database_location(db, sqlite=f"{repo} (SQLite)")


def database_location(db: str, sqlite: str = "a SQLite file") -> str:
    """Return ``HOST:PORT`` of a database URL (``sqlite`` for a SQLite one), for messages."""
    try:
        url = sqlalchemy.engine.make_url(db)
    except sqlalchemy.exc.ArgumentError:
        return db
    if url.get_backend_name() == "sqlite":
        return sqlite
    port = url.port or {"postgresql": 5432}.get(url.get_backend_name())
    return f"{url.host or 'localhost'}:{port}" if port else (url.host or "localhost")


def _is_unreachable(err: sqlalchemy.exc.DBAPIError) -> bool:
    """Whether a database error means the database cannot be used now (not a bad query)."""
    return err.connection_invalidated or isinstance(
        err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
    )


_HINTS = (
    ("password authentication failed", "check the password in the database URL or ~/.lsst/db-auth.yaml"),
    ("no password supplied", "give the password in ~/.lsst/db-auth.yaml"),
    ("does not exist", "check the database URL and namespace: registry.db and registry.namespace"),
)
"""Fixes appended to the database's reason, first match wins."""


def _reason(err: BaseException) -> str:
    """Return the database's own reason on one line (``connection refused``)."""
    orig = getattr(err, "orig", None) or err
    lines = str(orig).strip().splitlines()
    text = lines[0] if lines else type(orig).__name__
    # libpq: 'connection failed: connection to server at "h", port 5432 failed: FATAL:  reason'
    text = text.rsplit(" failed: ", 1)[-1]
    text = re.sub(r"^(FATAL|ERROR):\s+", "", text)
    host = re.match(r"failed to resolve host '(.*?)'", text)
    if host:
        text = f"unknown host {host.group(1)}"
    return text[:1].lower() + text[1:]


@contextlib.contextmanager
def database_errors(where: Callable[[], str]) -> Iterator[None]:
    """Turn a database error while opening a repository into one line saying what to fix.

    Parameters
    ----------
    where : callable
        Returns the database's location for the message (called only on error).

    Raises
    ------
    UsageError
        Raised for an unreachable database, refused credentials, a missing database or
        namespace, or a missing PostgreSQL driver.
    """
    try:
        yield
    except sqlalchemy.exc.DBAPIError as err:
        reason = _reason(err)
        hint = next((f" ({fix})" for key, fix in _HINTS if key in reason), "")
        verb = "reach" if _is_unreachable(err) else "use"
        raise UsageError(f"cannot {verb} the registry at {where()}: {reason}{hint}") from None
    except RuntimeError as err:
        if "btree_gist" not in str(err):
            raise
        raise UsageError(
            f"the registry database at {where()} lacks the btree_gist extension: "
            "run CREATE EXTENSION btree_gist; in it as its owner"
        ) from None
    except ImportError as err:
        if err.name != "psycopg":
            raise
        raise UsageError(
            f"the registry at {where()} is PostgreSQL, which needs psycopg 3: "
            "pip install 'butlerfs[postgres]'"
        ) from None


def _opening(repo: str) -> contextlib.AbstractContextManager[None]:
    return database_errors(lambda: registry_location(repo))


class _DropFailedToInstantiate(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to instantiate Butler")


@contextlib.contextmanager
def _quiet_butler_failure() -> Iterator[None]:
    """Drop the Butler's own log line on a failed open: the `UsageError` says it, once."""
    logger = logging.getLogger("lsst.daf.butler.direct_butler._direct_butler")
    quiet = _DropFailedToInstantiate()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


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
        governors=frozenset(name for name in dims.governors if name in dims.required),
    )
