"""Store the declared outputs of executions as Butler datasets.

The files of one data ID (matched by `wrapper.outputs.match_outputs`) become datasets of the
execution's data ID in the output RUN, all in one transaction: all of them or none.

Two ways to store a file, both with the project's ``ButlerfsFile`` storage class (Python type
`~lsst.resources.ResourcePath`, formatter `butlerfs.formatter.FileArtifactFormatter`), so that
``butler.get`` returns the artifact's URI:

* ingest-like (default): ``butler.ingest`` with a transfer mode (``move``: the file as written,
  renamed into the datastore when it is on the same filesystem; ``copy``; ``link``;
  ``symlink``, which leaves the datastore pointing into the workspace);
* put-like (``put=True``): ``butler.put`` through the formatter, as a PipelineTask would.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lsst.daf.butler import (
    Butler,
    DataCoordinate,
    DatasetRef,
    DatasetType,
    DimensionGroup,
    FileDataset,
    MissingDatasetTypeError,
)
from lsst.daf.butler.registry import MissingCollectionError

from butlerfs.errors import UsageError
from butlerfs.formatter import STORAGE_CLASS_NAME, FileArtifactFormatter, install, put_source_extension

from .options import TransferMode
from .outputs import OutputSpec

__all__ = ["ButlerHarvester", "DataIdKey", "TransferMode", "data_id_key", "ensure_file_storage_class"]

_LOG = logging.getLogger(__name__)

DataIdKey = tuple[tuple[str, Any], ...]
"""A hashable data ID: required dimensions and values in universe order."""


def data_id_key(data_id: DataCoordinate) -> DataIdKey:
    """Return the hashable key of a data ID (its required values)."""
    return tuple(data_id.required.items())


def ensure_file_storage_class(butler: Butler, *, put: bool) -> None:
    """Make ``ButlerfsFile`` and its formatter known to this process, whatever the repository's config.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        The writeable Butler.
    put : `bool`
        Whether the outputs go through ``put`` (which needs the formatter; ingest passes the
        formatter per file).

    Notes
    -----
    `butlerfs.formatter.install` (run on import) already did it for every Butler of the process;
    this says, once, what other processes need when the repository's config lacks the storage
    class: storage classes live in configuration, not in the registry, so a reader's
    ``butler.get`` of these datasets needs ``import butlerfs.formatter`` first (or ``butlerfs
    setup-repo`` of the repository).
    """
    install()
    formatters = getattr(getattr(butler, "_datastore", None), "formatterFactory", None)
    if formatters is not None and STORAGE_CLASS_NAME not in formatters:
        _LOG.info(
            "The repository's config does not name the %s storage class%s: readers of the outputs "
            "need 'import butlerfs.formatter' before butler.get, or 'butlerfs setup-repo' of the repository",
            STORAGE_CLASS_NAME,
            " (butler.put uses butlerfs's formatter)" if put else "",
        )


class ButlerHarvester:
    """Stores the outputs of executions in one output RUN; safe to call from worker threads.

    Parameters
    ----------
    butler : `lsst.daf.butler.Butler`
        A writeable Butler used by this object only (calls are serialised by a lock).
    output_run : `str`
        The RUN collection receiving the outputs.
    specs : `~collections.abc.Sequence` [`OutputSpec`]
        The declared outputs.
    dimensions : `lsst.daf.butler.DimensionGroup`
        Dimensions of the executions' data IDs: the outputs' dimensions.
    put : `bool`, optional
        Store through ``butler.put`` instead of ingest.
    transfer : `TransferMode` or `str`, optional
        Ingest transfer mode.
    """

    def __init__(
        self,
        butler: Butler,
        output_run: str,
        specs: Sequence[OutputSpec],
        dimensions: DimensionGroup,
        *,
        put: bool = False,
        transfer: TransferMode | str = TransferMode.MOVE,
    ) -> None:
        self.butler = butler
        self.output_run = output_run
        self.specs = list(specs)
        self.dimensions = dimensions
        self.put = put
        self.transfer = TransferMode(transfer)
        self._lock = threading.Lock()
        self._types: dict[str, DatasetType] = {}

    def check(self) -> None:
        """Check the outputs' dataset types against existing ones, registering nothing.

        Raises
        ------
        UsageError
            Raised for a dataset type that exists with other dimensions or another storage
            class, or two outputs of one dataset type.
        """
        seen: dict[str, str] = {}
        for spec in self.specs:
            if spec.dataset_type in seen:
                raise UsageError(
                    f"outputs {seen[spec.dataset_type]} and {spec.name} both store dataset type "
                    f"{spec.dataset_type}: give each its own"
                )
            seen[spec.dataset_type] = spec.name
            wanted = DatasetType(
                spec.dataset_type, self.dimensions, STORAGE_CLASS_NAME, universe=self.butler.dimensions
            )
            try:
                existing = self.butler.get_dataset_type(spec.dataset_type)
            except MissingDatasetTypeError:
                self._types[spec.name] = wanted
                continue
            if existing.dimensions != self.dimensions or existing.storageClass_name != STORAGE_CLASS_NAME:
                raise UsageError(
                    f"dataset type {spec.dataset_type} exists with dimensions {existing.dimensions} and "
                    f"storage class {existing.storageClass_name}; outputs of this run need "
                    f"{self.dimensions} and {STORAGE_CLASS_NAME}: name another with "
                    f"--output {spec.name}=GLOB:OTHER_NAME"
                )
            self._types[spec.name] = existing

    def prepare(self) -> None:
        """Check, then register the output RUN and missing dataset types.

        Raises
        ------
        UsageError
            As `check` does.
        """
        self.check()
        ensure_file_storage_class(self.butler, put=self.put)
        with self._lock:
            for dataset_type in self._types.values():
                if self.butler.registry.registerDatasetType(dataset_type):
                    _LOG.info("Registered dataset type %s", dataset_type)
            if self.butler.collections.register(self.output_run):
                _LOG.info("Registered RUN collection %s", self.output_run)

    def done(self) -> set[DataIdKey]:
        """Return the data IDs whose outputs all exist in the output RUN already."""
        if not self.specs:
            return set()
        with self._lock:
            try:
                self.butler.collections.get_info(self.output_run)
            except MissingCollectionError:
                return set()
            found: set[DataIdKey] | None = None
            for spec in self.specs:
                try:
                    refs = self.butler.query_datasets(
                        spec.dataset_type, self.output_run, limit=None, explain=False
                    )
                except MissingDatasetTypeError:
                    return set()
                keys = {data_id_key(ref.dataId) for ref in refs}
                found = keys if found is None else found & keys
            return found or set()

    def store(self, data_id: DataCoordinate, files: Mapping[str, Path]) -> dict[str, str]:
        """Store the files of one data ID, all or none.

        Parameters
        ----------
        data_id : `lsst.daf.butler.DataCoordinate`
            The execution's (expanded) data ID.
        files : `~collections.abc.Mapping` [`str`, `pathlib.Path`]
            The file of each output by name.

        Returns
        -------
        ids : `dict` [`str`, `str`]
            The new dataset's UUID per output name.

        Raises
        ------
        Exception
            Whatever the Butler raises (a conflict with an existing dataset, a full disk):
            nothing of this data ID is stored then.
        """
        refs = {name: DatasetRef(self._types[name], data_id, run=self.output_run) for name in files}
        with self._lock:
            if self.put:
                with self.butler.transaction():
                    for name, path in files.items():
                        with put_source_extension(path) as uri:
                            self.butler.put(uri, refs[name])
            else:
                datasets = [
                    FileDataset(path=str(path), refs=[refs[name]], formatter=FileArtifactFormatter)
                    for name, path in files.items()
                ]
                self.butler.ingest(*datasets, transfer=str(self.transfer))
        return {name: str(ref.id) for name, ref in refs.items()}
