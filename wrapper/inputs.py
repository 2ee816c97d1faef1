"""Which executions to run: data IDs from the first input, the other inputs by the same data ID.

The data IDs are those of the first input's datasets, found (find-first) in the collections
and constrained by ``--where``: exactly those ``butler query-datasets --find-first`` lists,
with the dimension records that exist (a missing ``visit_detector_region`` loses nothing).
Every other input is looked up with the same data ID, as butler does it: a non-calibration
dataset type find-first in the collections (one query per input for all data IDs), a
calibration dataset type through the CALIBRATION collections by the validity range that
overlaps the exposure's or visit's timespan (``butler.find_dataset(..., timespan=...)`` per
data ID).

Everything here runs before any program does, so every mistake is reported first.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Any

from lsst.daf.butler import (
    Butler,
    CalibrationLookupError,
    DataCoordinate,
    DatasetRef,
    DatasetType,
    DimensionDataAttacher,
    DimensionGroup,
    MissingDatasetTypeError,
)

from butlerfs.artifacts import extension_of, local_path
from butlerfs.datastore import Datastore, datastore_for
from butlerfs.errors import UsageError
from butlerfs.registry import check_collections, open_butler

from .harvest import DataIdKey, data_id_key
from .workspace import StagingMode

__all__ = [
    "InputSpec",
    "Unit",
    "check_collections",
    "direct_path",
    "file_extension",
    "find_units",
    "get_dataset_type",
    "open_butler",
]

_LOG = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RESERVED = {"workdir", "dataId"}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A declared input: ``NAME=DATASET_TYPE[:MODE]``.

    Attributes
    ----------
    name : `str`
        The placeholder name.
    dataset_type : `str`
        The dataset type.
    mode : `StagingMode`
        How to stage it (default ``mount``).
    """

    name: str
    dataset_type: str
    mode: StagingMode = StagingMode.MOUNT

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """Parse ``NAME=DATASET_TYPE[:MODE]``; ``DATASET_TYPE`` alone names the input after it.

        Raises
        ------
        UsageError
            Raised for anything else.
        """
        name, sep, rest = text.partition("=")
        if not sep:
            name, rest = text.partition(":")[0], text
        dataset_type, _, mode = rest.partition(":")
        name, dataset_type, mode = name.strip(), dataset_type.strip(), mode.strip()
        modes = ", ".join(m.value for m in StagingMode)
        if not _NAME.fullmatch(name) or not _NAME.fullmatch(dataset_type):
            raise UsageError(
                f"malformed --input {text!r}: expected NAME=DATASET_TYPE[:MODE], e.g. img=calexp"
            )
        if name in _RESERVED:
            raise UsageError(f"--input {text!r}: {name} is reserved for the {{{name}}} placeholder")
        try:
            staging = StagingMode(mode) if mode else StagingMode.MOUNT
        except ValueError:
            raise UsageError(f"--input {text!r}: unknown staging mode {mode!r} (one of {modes})") from None
        return cls(name, dataset_type, staging)


@dataclasses.dataclass
class Unit:
    """One execution: its data ID and input datasets.

    Attributes
    ----------
    data_id : `lsst.daf.butler.DataCoordinate`
        The first input's data ID, expanded: implied dimensions and the records that exist
        (`None` for an absent one, e.g. a visit without ``visit_detector_region`` rows).
    refs : `dict` [`str`, `lsst.daf.butler.DatasetRef`]
        The dataset of each input found, by input name.
    uris : `dict` [`str`, `str`]
        The artifact URI of each input found.
    extensions : `dict` [`str`, `str`]
        The artifact extension of each input found (``.fits``), from its datastore record:
        the mount names the file with it (a Butler server's URIs carry no file name).
    missing : `list` [`str`]
        Why an input has no dataset; the unit fails without running when not empty.
    """

    data_id: DataCoordinate
    refs: dict[str, DatasetRef] = dataclasses.field(default_factory=dict)
    uris: dict[str, str] = dataclasses.field(default_factory=dict)
    extensions: dict[str, str] = dataclasses.field(default_factory=dict)
    missing: list[str] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> DataIdKey:
        """The hashable data ID (required dimensions)."""
        return data_id_key(self.data_id)

    @property
    def required(self) -> dict[str, Any]:
        """Required dimensions and values, in universe order."""
        return dict(self.data_id.required)

    @property
    def values(self) -> dict[str, Any]:
        """Every dimension value, implied ones included (for ``{dataId.KEY}``)."""
        return dict(self.data_id.mapping)


def get_dataset_type(butler: Butler, spec: InputSpec) -> DatasetType:
    """Return an input's dataset type.

    Raises
    ------
    UsageError
        Raised if it is not registered.
    """
    try:
        return butler.get_dataset_type(spec.dataset_type)
    except MissingDatasetTypeError:
        raise UsageError(
            f"unknown dataset type {spec.dataset_type!r} (--input {spec.name}): "
            "list them with `butler query-dataset-types`"
        ) from None


def find_units(
    butler: Butler, collections: Sequence[str], specs: Sequence[InputSpec], where: str = ""
) -> tuple[DatasetType, list[Unit]]:
    """Find the executions: one per dataset of the first input.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The repository.
    collections : `~collections.abc.Sequence` [`str`]
        Collections to search, in order.
    specs : `~collections.abc.Sequence` [`InputSpec`]
        The inputs; the first one gives the data IDs.
    where : `str`, optional
        Query expression constraining the first input's datasets.

    Returns
    -------
    first : `lsst.daf.butler.DatasetType`
        The first input's dataset type (its dimensions are the executions' dimensions).
    units : `list` [`Unit`]
        The executions in data ID order.

    Raises
    ------
    UsageError
        Raised for no inputs, duplicate names, an unknown dataset type, an input whose
        dimensions the first input's data ID does not fix, an invalid ``where``, no data ID
        matched, or a dataset stored as several files (a disassembled composite).
    """
    if not specs:
        raise UsageError("no --input given: the first one gives the data IDs, e.g. --input img=calexp")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UsageError(f"--input names must differ: {', '.join(names)}")
    datastore = datastore_for(butler)
    for spec in specs:
        if spec.mode is StagingMode.DIRECT and not datastore.serves_paths:
            raise UsageError(
                f"input {spec.name}: {datastore.description} serves artifacts only by URL, so they cannot "
                "be staged direct: use mount (the default), copy or uri"
            )
    types = {s.name: get_dataset_type(butler, s) for s in specs}
    first = types[specs[0].name]
    for spec in specs[1:]:
        needed = set(types[spec.name].dimensions.required)
        if not needed <= set(first.dimensions.names):
            raise UsageError(
                f"input {spec.name} ({spec.dataset_type}) needs {', '.join(sorted(needed))}, but the "
                f"data IDs of {specs[0].dataset_type} fix only {', '.join(first.dimensions.names)}: "
                "put the input with the most dimensions first"
            )
    try:
        refs = _query_first(butler, first, collections, where)
    except Exception as err:  # the Butler raises many types for a bad expression
        if type(err).__name__ in ("InvalidQueryError", "UserExpressionError", "UserExpressionSyntaxError"):
            raise UsageError(f"invalid --where {where!r}: {err}") from None
        raise
    if not refs:
        constraint = f" matching --where {where!r}" if where else ""
        raise UsageError(
            f"no data ID matched: no {specs[0].dataset_type} datasets in {', '.join(collections)}{constraint}"
        )
    datastore.check(lambda: [refs[0].id])
    units = [Unit(ref.dataId, refs={specs[0].name: ref}) for ref in refs]
    for spec in specs[1:]:
        dataset_type = types[spec.name]
        if dataset_type.isCalibration():
            _find_calibrations(butler, collections, spec, dataset_type, units)
        else:
            _find_by_data_id(butler, collections, spec, dataset_type, units, specs[0].dataset_type, where)
    _attach_uris(datastore, specs, units)
    _LOG.info("%d data IDs from %s", len(units), specs[0].dataset_type)
    return first, units


def _query_first(
    butler: Butler, first: DatasetType, collections: Sequence[str], where: str
) -> list[DatasetRef]:
    """The first input's datasets, find-first, in data ID order, each with the records that exist.

    A query with dimension records joins every record table of the data ID, so a dataset whose
    data ID lacks one (a visit without ``visit_detector_region`` rows: hand-built repositories,
    external instruments) would vanish from it, while ``butler query-datasets`` lists it. An
    exact count without records (one SQL ``COUNT``) tells whether anything was dropped; only
    then are all datasets fetched again and the dropped ones expanded in bulk with the records
    there are.
    """
    with butler.query() as query:
        results = query.datasets(first, collections, find_first=True)
        if where:
            results = results.where(where)
        results = results.order_by(*first.dimensions.required)
        expanded = list(results.with_dimension_records())
        total = results.count(exact=True, discard=True)
        if total == len(expanded):
            return expanded
        plain = list(results)
    by_id = {ref.id: ref for ref in expanded}
    dropped = [ref for ref in plain if ref.id not in by_id]
    if dropped:
        for ref, data_id in zip(dropped, _expand_partially(butler, first.dimensions, dropped), strict=True):
            by_id[ref.id] = ref.expanded(data_id)
    return [by_id[ref.id] for ref in plain]


def _expand_partially(
    butler: Butler, dimensions: DimensionGroup, refs: Sequence[DatasetRef]
) -> list[DataCoordinate]:
    """Attach the dimension records that exist to the refs' full data IDs, `None` for the others.

    One query per dimension element for all refs (daf_butler's attacher, which tolerates
    missing records but leaves them out of the mapping; `DataCoordinate.expanded` wants every
    element, `None` marking an absent record).
    """
    attacher = DimensionDataAttacher(dimensions=dimensions)
    with butler.query() as query:
        attached = attacher.attach(dimensions, [ref.dataId for ref in refs], query)
    result = []
    absent: dict[str, int] = {}
    for ref, with_records in zip(refs, attached, strict=True):
        records = {name: with_records.records.get(name) for name in dimensions.elements}
        for name, record in records.items():
            if record is None:
                absent[name] = absent.get(name, 0) + 1
        result.append(ref.dataId.expanded(records))
    _LOG.info(
        "%d %s data IDs lack dimension records (%s); they run with the records that exist",
        len(refs),
        refs[0].datasetType.name,
        ", ".join(f"{name}: {count}" for name, count in sorted(absent.items())) or "none",
    )
    return result


def _find_calibrations(
    butler: Butler, collections: Sequence[str], spec: InputSpec, dataset_type: DatasetType, units: list[Unit]
) -> None:
    for unit in units:
        timespan = unit.data_id.timespan
        if timespan is None:
            unit.missing.append(
                f"{spec.name}: the data ID has no exposure or visit timespan to find a calibration"
            )
            continue
        # Only the calibration's own dimensions: a client/server Butler fails on a fully
        # expanded visit data ID, and a direct one needs no more.
        data_id = unit.data_id.subset(dataset_type.dimensions)
        try:
            ref = butler.find_dataset(dataset_type, data_id, collections=collections, timespan=timespan)
        except CalibrationLookupError as err:
            unit.missing.append(f"{spec.name}: {err}")
            continue
        if ref is None:
            unit.missing.append(f"{spec.name}: no {dataset_type.name} valid at {timespan} in the collections")
        else:
            unit.refs[spec.name] = ref


def _find_by_data_id(
    butler: Butler,
    collections: Sequence[str],
    spec: InputSpec,
    dataset_type: DatasetType,
    units: list[Unit],
    first_type: str,
    where: str,
) -> None:
    """One query for all units: the datasets of ``dataset_type`` where the first input has datasets."""
    required = list(dataset_type.dimensions.required)
    with butler.query() as query:
        query = query.join_dataset_search(first_type, collections)
        if where:
            query = query.where(where)
        found = {
            tuple(ref.dataId.required.items()): ref
            for ref in query.datasets(dataset_type, collections, find_first=True)
        }
    for unit in units:
        key = tuple((name, unit.data_id[name]) for name in required)
        ref = found.get(key)
        if ref is None:
            unit.missing.append(f"{spec.name}: no {dataset_type.name} for this data ID in the collections")
        else:
            unit.refs[spec.name] = ref


def _attach_uris(datastore: Datastore, specs: Sequence[InputSpec], units: list[Unit]) -> None:
    for spec in specs:
        refs = [unit.refs[spec.name] for unit in units if spec.name in unit.refs]
        found = datastore.primary_artifacts([ref.id for ref in refs])
        for unit in units:
            ref = unit.refs.get(spec.name)
            if ref is None:
                continue
            if ref.id not in found:
                unit.missing.append(f"{spec.name}: dataset {ref.id} has no file in the datastore")
                continue
            artifact = found[ref.id]
            if artifact is None:
                raise UsageError(
                    f"input {spec.name} ({spec.dataset_type}) is stored as a disassembled composite "
                    "(one file per component); butlerfs run needs one file per dataset"
                )
            unit.uris[spec.name] = artifact.uri
            unit.extensions[spec.name] = extension_of(artifact.path)
            if spec.mode is StagingMode.DIRECT and direct_path(artifact.uri) is None:
                raise UsageError(
                    f"input {spec.name}: {artifact.uri} is not a file at rest on POSIX, so it cannot be "
                    "staged direct: use mount (the default) or copy"
                )


def direct_path(uri: str) -> str | None:
    """Return the POSIX path of an artifact at rest, or `None` (remote, or a member of a zip)."""
    if "#zip-path=" in uri:
        return None
    return local_path(uri)


def file_extension(uri: str) -> str:
    """Return an artifact's extension (``.fits``, ``.fits.fz``), as the mount names files."""
    return extension_of(uri)
