"""Everything butlerfs asks of a Butler: the one module that imports `lsst.daf.butler`.

The filesystem needs four answers: which dataset types to show, how many datasets
lie under a partial data ID, the distinct values of the next dimension, and the
datasets (with their datastore records) under a partial data ID. No call here reads
an artifact or imports a formatter, so repositories whose storage classes need afw
(``ExposureF``) are served without it.

A Butler is not thread-safe, so every query runs under one lock; FUSE reads never
come here.

Registry faults are translated here, once: a database that cannot be reached (or refuses
the credentials) is a one-line `UsageError` when the repository is opened, and a
`RegistryUnavailableError` (``EIO``) for a query of a mounted repository, with one warning
per outage in the log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fnmatch
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
from lsst.daf.butler.datastore.stored_file_info import NULLSTR
from lsst.daf.butler.registry import MissingCollectionError
from lsst.resources import ResourcePath

from .errors import FsError, UsageError
from .layout import DataIdValue

__all__ = [
    "Artifact",
    "DatasetEntry",
    "DatasetTypeInfo",
    "RegistryUnavailableError",
    "RepoIndex",
    "check_collections",
    "database_errors",
    "database_location",
    "open_butler",
    "registry_location",
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
        self._location = ""  # for messages; read from the configuration at the first fault
        self._down_since: float | None = None
        with _opening(repo):
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

    def count(self, dataset_type: str, fixed: Mapping[str, DataIdValue]) -> int:
        """Return about how many datasets lie under a partial data ID.

        An upper bound is good enough: it only decides whether a directory's
        whole subtree is fetched at once.
        """
        with self._query() as butler, butler.query() as query:
            query = query.join_dataset_search(dataset_type, self.collections)
            info = self._types[dataset_type]
            return query.data_ids(info.dimensions).where(fixed, self.where).count(exact=False)

    def distinct(
        self, dataset_type: str, fixed: Mapping[str, DataIdValue], dimension: str
    ) -> list[DataIdValue]:
        """Return the sorted values of ``dimension`` among the datasets under ``fixed``."""
        with self._query() as butler, butler.query() as query:
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
        with self._query() as butler, butler.query() as query:
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

    @contextlib.contextmanager
    def _query(self) -> Iterator[Butler]:
        """Hold the Butler for one query; turn a database that does not answer into ``EIO``."""
        with self._lock:
            try:
                yield self._butler
            except sqlalchemy.exc.DBAPIError as err:
                if not _is_unreachable(err):
                    raise
                self._location = self._location or registry_location(self.repo)
                message = f"cannot reach the registry at {self._location}: {_reason(err)}"
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
        except sqlalchemy.exc.DBAPIError:
            raise  # the database, not the expression
        except Exception as err:  # the query system raises several unrelated types for bad syntax
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"invalid --where expression {self.where!r}: {message}") from None

    def close(self) -> None:
        """Release the Butler's database connections."""
        self._butler.close()


def open_butler(repo: str, *, writeable: bool = False) -> Butler:
    """Open a repository, turning the Butler's errors into one line.

    Raises
    ------
    UsageError
        Raised if ``repo`` is not a Butler repository, or its registry database cannot
        be reached or refuses the credentials.
    """
    # libpq waits for ever for a server that does not answer; a user's own setting wins.
    os.environ.setdefault("PGCONNECT_TIMEOUT", "10")
    try:
        with _opening(repo), _quiet_butler_failure():
            return Butler.from_config(repo, writeable=writeable)
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as err:
        first = str(err).split(" (given", 1)[0]
        raise UsageError(
            f"{repo} is not a Butler repository ({first}): give the directory holding butler.yaml"
        ) from None


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
    )


def _file_datastores(butler: Butler) -> list[Any]:
    datastore = butler._datastore
    return [s for s in getattr(datastore, "datastores", [datastore]) if hasattr(s, "locationFactory")]
