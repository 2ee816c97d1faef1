"""Listing queries read from a direct Butler's tags tables, not through the query system.

Each dataset type's datasets in RUN and TAGGED collections are rows of a tags table (one per
set of dimensions): dataset ID, type, collection and the data ID's required dimensions,
with a unique index on (type, collection, dimensions in universe order). daf_butler's query
system joins it with the tables of the dimensions' records (``visit`` and
``physical_filter`` for a ``calexp``); those joins never drop a row (the tags table's
foreign keys guarantee the records exist) but cost time at scale. Measured on PostgreSQL
15 with a collection of 10^6 datasets:

* a directory's values (`TagsTable.distinct`): while they are few, a recursive query steps
  through the index one value at a time, a loose index scan that neither PostgreSQL 15
  nor SQLite does by itself; once that walk has found `WALK_LIMIT` values without
  reaching the end, one plain ``DISTINCT`` reads them. The 100 detectors of an
  instrument: 0.01 s against 0.5-0.6 s; the 10,000 visits of a detector: 0.03-0.06 s.
* a piece's datasets (`TagsTable.rows`): the tags table joined with the ``dataset`` table
  (run, and ingest date as stored rather than an astropy ``Time`` per row), each data ID's
  first collection in search order found by a window function; the query of their IDs is
  also returned, for the datastore to join its records with
  (`DirectDatastore.artifacts_selected`). A run of 5,000 with its records: 0.35-0.42 s
  against 0.49-0.67 s; 2,000 data IDs in each of 8 RUNs of a chain (reruns): 0.12-0.19 s
  against 0.20-0.25 s (SQLite: 0.18-0.23 s against 0.22 s).
* the state check's count of a type's datasets in a RUN collection (`TagsTable.count`):
  0.07 s against 0.22 s.

The Butler answers instead (`None`) when the tags table cannot give its answer: a
calibration type searched in CALIBRATION collections (their datasets are in another
table; any other type's cannot be certified, so such collections are skipped for it), a
dimension that is not a column of the tags table, another dataset or collection manager.
A ``where`` constraint is left to the Butler by `RepoIndex`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy
from lsst.daf.butler import CollectionType
from lsst.daf.butler.direct_butler import DirectButler
from lsst.daf.butler.registry.wildcards import CollectionWildcard

from .layout import DataIdValue

__all__ = ["WALK_LIMIT", "TagsTable", "dataset_table", "stored_ingest_date", "tags_table"]

WALK_LIMIT = 256
"""Values found one index probe at a time before one ``DISTINCT`` reads them all.

A probe costs about 15 us of PostgreSQL time, a row of a ``DISTINCT`` about 0.15 us: the
walk wins while a directory has fewer values than about 1% of its datasets, and a
directory with many values wastes at most this many probes (4 ms) before the scan."""

_WALKED_COLLECTIONS = 8
"""Most collections walked one by one (the index leads with the collection); more: one scan."""

_TAGGED = (CollectionType.RUN, CollectionType.TAGGED)


def tags_table(butler: Any) -> TagsTable | None:
    """Return a reader of ``butler``'s tags tables, or `None` for a Butler without them here."""
    if not isinstance(butler, DirectButler):
        return None
    try:
        registry = butler._registry
        managers = registry._managers
        return TagsTable(registry._db, managers.datasets, managers.collections, dataset_table(butler))
    except AttributeError:
        return None


def dataset_table(butler: DirectButler) -> sqlalchemy.Table | None:
    """Return the registry's ``dataset`` table (with ``ingest_date``), or `None` if not found."""
    try:
        table = butler._registry._managers.datasets._static.dataset  # type: ignore[attr-defined]
    except AttributeError:
        return None
    if not isinstance(table, sqlalchemy.Table) or not {"id", "ingest_date"} <= set(table.c.keys()):
        return None
    return table


def stored_ingest_date(dataset: sqlalchemy.Table) -> sqlalchemy.ColumnElement[Any]:
    """The ``dataset`` table's ingest date as stored (nanoseconds TAI, or a naive UTC timestamp).

    Without the column's TypeDecorator, which makes an astropy ``Time`` of each row.
    """
    date = dataset.c.ingest_date
    return sqlalchemy.type_coerce(date, getattr(date.type, "impl_instance", date.type))


@dataclasses.dataclass(frozen=True)
class _Search:
    """One dataset type's tags table and the collections a search reads in it."""

    table: sqlalchemy.Table
    type_id: int
    collection: sqlalchemy.Column
    """The table's collection key column."""
    keys: list[Any]
    """The keys of the RUN and TAGGED collections searched, in search order."""
    leading: list[str]
    """The dimensions of the table's unique index, in its order (after type and collection)."""
    names: dict[Any, str]
    """The names of the RUN and TAGGED collections searched, by key."""

    def where(self, fixed: Mapping[str, DataIdValue]) -> list[Any]:
        """The conditions of the type and a partial data ID (each query adds the collections')."""
        c = self.table.c
        return [c.dataset_type_id == self.type_id, *(c[d] == v for d, v in fixed.items())]

    def has(self, *dimensions: str) -> bool:
        """Whether the table has a column for each dimension."""
        return all(d in self.table.c for d in dimensions)


class TagsTable:
    """The tags tables of a direct Butler's registry (used under its owner's lock).

    Parameters
    ----------
    db : `lsst.daf.butler.registry.interfaces.Database`
        The registry's database.
    datasets, collections
        The registry's dataset and collection managers.
    dataset : `sqlalchemy.Table` or `None`
        The registry's ``dataset`` table (`dataset_table`); `None`: `rows` is left to the Butler.
    """

    def __init__(self, db: Any, datasets: Any, collections: Any, dataset: sqlalchemy.Table | None) -> None:
        self._db = db
        self._datasets = datasets
        self._collections = collections
        self._dataset = dataset

    def distinct(
        self,
        dataset_type: str,
        collections: Sequence[str],
        fixed: Mapping[str, DataIdValue],
        dimension: str,
    ) -> list[DataIdValue] | None:
        """Return the sorted values of ``dimension`` among the datasets under ``fixed``.

        The values `RepoIndex.distinct` asks the Butler for, found in its collections
        (CHAINED ones flattened), without a ``where``; `None` if this module cannot tell.
        """
        search = self._search(dataset_type, collections)
        if search is None or not search.has(*fixed, dimension):
            return None
        column, where, leading = search.table.c[dimension], search.where(fixed), search.leading
        if (
            len(search.keys) <= _WALKED_COLLECTIONS
            and set(leading[: len(fixed)]) == set(fixed)
            and leading[len(fixed) : len(fixed) + 1] == [dimension]
        ):
            values: set[DataIdValue] = set()
            for key in search.keys:
                walked = self._walk(column, [*where, search.collection == key])
                if walked is None:
                    break
                values.update(walked)
            else:
                return sorted(values)
        scan = sqlalchemy.select(column).where(*where, search.collection.in_(search.keys)).distinct()
        with self._db.query(scan) as result:
            return sorted(result.scalars())

    def count(self, dataset_type: str, run: str) -> int | None:
        """Return how many datasets of a type a RUN collection holds; `None` if this module cannot tell."""
        search = self._search(dataset_type, [run])
        if search is None or len(search.keys) != 1:  # not a RUN or TAGGED collection
            return None
        query = sqlalchemy.select(sqlalchemy.func.count()).where(
            *search.where({}), search.collection == search.keys[0]
        )
        with self._db.query(query) as result:
            return int(result.scalar_one())

    def rows(
        self,
        dataset_type: str,
        collections: Sequence[str],
        dimensions: Sequence[str],
        fixed: Mapping[str, DataIdValue],
        group: tuple[str, Sequence[DataIdValue]] | None,
        *,
        dates: bool,
        max_rows: int | None,
    ) -> tuple[list[tuple[Any, ...]], sqlalchemy.Select] | None:
        """Return ``(dataset_id, run, ingest_date, *data ID)`` of each dataset under a partial data ID.

        What `RepoIndex.rows` asks the Butler for: the datasets a find-first search of
        ``collections`` finds, narrowed to ``group``'s values of one dimension (a range
        for integers); their data IDs in ``dimensions`` order; the ingest date as
        stored (nanoseconds TAI, or a naive UTC timestamp), `None` without ``dates``.
        With ``max_rows``, at most ``max_rows + 1`` datasets. Also returned: a query
        of the IDs of these datasets, for `DirectDatastore.artifacts_selected`. `None`
        if this module cannot tell.
        """
        search = self._search(dataset_type, collections)
        dataset = self._dataset
        run_column = self._collections.getRunForeignKeyName()
        if (
            search is None
            or dataset is None
            or run_column not in dataset.c
            or not search.has(*dimensions, *fixed, *(group[:1] if group else ()))
        ):
            return None
        table = search.table
        where = [*search.where(fixed), search.collection.in_(search.keys)]
        if group is not None:
            column, values = table.c[group[0]], group[1]
            if all(type(v) is int for v in values):  # as _narrow: siblings are a range
                where.append(column.between(min(values), max(values)))
            else:
                where.append(column.in_(list(values)))
        found: Any = table
        conditions = where
        if len(search.keys) > 1:
            # Each data ID's dataset in its first collection in search order, found in SQL as
            # daf_butler does: a chain of reruns holds the same data IDs many times over.
            positions: dict[Any, int] = {}
            for position, key in enumerate(search.keys):
                positions.setdefault(key, position)
            rank = sqlalchemy.case(positions, value=search.collection)
            number = sqlalchemy.func.row_number().over(
                partition_by=[table.c[d] for d in dimensions] or None, order_by=rank
            )
            found = (
                sqlalchemy.select(
                    table.c.dataset_id,
                    search.collection,
                    *(table.c[d] for d in dimensions),
                    number.label("butlerfs_rank"),
                )
                .where(*where)
                .subquery("butlerfs_found")
            )
            conditions = [found.c.butlerfs_rank == 1]
        c = found.c
        query = (
            sqlalchemy.select(
                c.dataset_id,
                c[search.collection.name],
                dataset.c[run_column],
                stored_ingest_date(dataset) if dates else sqlalchemy.null(),
                *(c[d] for d in dimensions),
            )
            .select_from(found.join(dataset, dataset.c.id == c.dataset_id))
            .where(*conditions)
        )
        if max_rows is not None:
            query = query.limit(max_rows + 1)
        with self._db.query(query) as result:
            rows = result.fetchall()
        # A run searched is named by the records the search resolved; only the run of a
        # dataset found in a TAGGED collection may need its own lookup (one query each).
        names = dict(search.names)
        for key in {row[2] for row in rows} - names.keys():
            names[key] = self._collections[key].name
        ids = sqlalchemy.select(c.dataset_id).where(*conditions)
        return [(row[0], names[row[2]], row[3], *row[4:]) for row in rows], ids

    def _walk(self, column: Any, where: list[Any]) -> list[DataIdValue] | None:
        """The distinct values of ``column`` one index probe each; `None` past `WALK_LIMIT`."""
        first = sqlalchemy.select(sqlalchemy.func.min(column).label("value")).where(*where)
        found = first.cte("butlerfs_values", recursive=True)
        after = sqlalchemy.select(sqlalchemy.func.min(column)).where(*where, column > found.c.value)
        found = found.union_all(
            sqlalchemy.select(after.scalar_subquery()).select_from(found).where(found.c.value.is_not(None))
        )
        query = sqlalchemy.select(found.c.value).where(found.c.value.is_not(None)).limit(WALK_LIMIT + 1)
        with self._db.query(query) as result:
            values = list(result.scalars())
        return values if len(values) <= WALK_LIMIT else None

    def _search(self, dataset_type: str, collections: Sequence[str]) -> _Search | None:
        """Return where a search of ``collections`` finds a type's datasets; `None` if not all in tags.

        A CALIBRATION collection holds only calibration types' datasets, in another
        table: skipped for any other type (a search path like ``LSSTCam/defaults`` has
        one), left to the Butler for a calibration type.
        """
        try:
            storage = self._datasets._find_storage(dataset_type)
            table = self._datasets._get_tags_table(storage.dynamic_tables)
            name = self._collections.getCollectionForeignKeyName()
        except AttributeError:
            return None
        if not isinstance(table, sqlalchemy.Table) or not {"dataset_type_id", name} <= set(table.c.keys()):
            return None
        records = self._collections.resolve_wildcard(
            CollectionWildcard.from_expression(list(collections)), flatten_chains=True
        )
        calibrations = [r for r in records if r.type == CollectionType.CALIBRATION]
        if calibrations and storage.dataset_type.isCalibration():
            return None
        if any(r.type not in _TAGGED for r in records if r not in calibrations):
            return None
        leading: list[str] = []
        for constraint in table.constraints:
            names = [c.name for c in getattr(constraint, "columns", ())]
            if isinstance(constraint, sqlalchemy.UniqueConstraint) and names[:2] == ["dataset_type_id", name]:
                leading = names[2:]
        keys = [r.key for r in records if r.type in _TAGGED]
        named = {r.key: r.name for r in records if r.type in _TAGGED}
        return _Search(table, storage.dataset_type_id, table.c[name], keys, leading, named)
