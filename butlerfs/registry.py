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
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import logging
import re
import threading
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from lsst.daf.butler import Butler, CollectionType, DatasetType
from lsst.daf.butler.registry import MissingCollectionError

from .datastore import Artifact, Datastore, datastore_for
from .errors import UsageError
from .layout import DataIdValue

__all__ = ["Artifact", "DatasetEntry", "DatasetTypeInfo", "RepoIndex", "check_collections", "open_butler"]

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
        self.datastore: Datastore = datastore_for(self._butler)
        """The records and artifact URIs of the repository's datastore."""
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

    def count(self, dataset_type: str, fixed: Mapping[str, DataIdValue]) -> int:
        """Return about how many datasets lie under a partial data ID.

        An upper bound is good enough: it only decides whether a directory's
        whole subtree is fetched at once.
        """
        with self._lock, self._butler.query() as query:
            query = query.join_dataset_search(dataset_type, self.collections)
            info = self._types[dataset_type]
            return query.data_ids(info.dimensions).where(fixed, self.where).count(exact=False)

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

    def _sample_ids(self) -> list[uuid.UUID]:
        """Return the ID of one dataset shown, if any (for `Datastore.check`)."""
        with self._butler.query() as query:
            for name in self._types:
                for ref in query.datasets(name, self.collections).limit(1):
                    return [ref.id]
        return []

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


def open_butler(repo: str, *, writeable: bool = False) -> Butler:
    """Open a repository (path, URI, Butler server URL or label), turning errors into one line.

    Raises
    ------
    UsageError
        Raised if ``repo`` is not a Butler repository, or a Butler server cannot be used:
        no token, the ``remote`` extra missing, an unknown repository name, no answer.
    """
    try:
        return Butler.from_config(repo, writeable=writeable)
    except ImportError as err:
        # Only a client/server Butler imports more than daf_butler's own dependencies.
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
