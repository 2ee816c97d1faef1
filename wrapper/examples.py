"""A native PipelineTask that sits between two external ones (``pipelines/chained.yaml``).

`BrightSourcesTask` reads a SExtractor FITS catalog written by an `ExternalProgramTask`
(storage class ``ButlerfsFile``: ``get`` returns the artifact's
`~lsst.resources.ResourcePath`) and writes the brightest sources as a CSV file, which it
``put``s the same way, for the next external program to read.
"""

from __future__ import annotations

import csv
import logging
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from astropy.io import fits
from lsst.pex.config import Field
from lsst.pipe.base import (
    InputQuantizedConnection,
    OutputQuantizedConnection,
    PipelineTask,
    PipelineTaskConfig,
    PipelineTaskConnections,
    QuantumContext,
)
from lsst.pipe.base import connectionTypes as cT
from lsst.resources import ResourcePath

from butlerfs.formatter import STORAGE_CLASS_NAME, put_source_extension

from .task import TASK_LOG_PREFIX

__all__ = ["BrightSourcesConfig", "BrightSourcesConnections", "BrightSourcesTask"]


class BrightSourcesConnections(PipelineTaskConnections, dimensions=("instrument", "visit", "detector")):
    """A source catalog in, its brightest sources out."""

    catalog = cT.Input(
        doc="FITS binary table (FITS_1.0 catalog) with a flux column.",
        name="sextractorCatalog",
        storageClass=STORAGE_CLASS_NAME,
        dimensions=("instrument", "visit", "detector"),
    )
    bright = cT.Output(
        doc="CSV file of the brightest sources.",
        name="brightSources",
        storageClass=STORAGE_CLASS_NAME,
        dimensions=("instrument", "visit", "detector"),
    )


class BrightSourcesConfig(PipelineTaskConfig, pipelineConnections=BrightSourcesConnections):
    """Config of `BrightSourcesTask`."""

    fluxColumn = Field[str](doc="Column to rank by, brightest first.", default="FLUX_AUTO")
    columns = Field[str](doc="Comma-separated columns to write.", default="NUMBER,X_IMAGE,Y_IMAGE,FLUX_AUTO")
    maxSources = Field[int](doc="How many sources to keep.", default=10)


class BrightSourcesTask(PipelineTask):
    """Keep the ``maxSources`` brightest rows of a catalog file, as CSV."""

    ConfigClass: ClassVar[type[BrightSourcesConfig]] = BrightSourcesConfig
    _DefaultName: ClassVar[str] = "brightSources"
    config: BrightSourcesConfig

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("log", logging.getLogger(TASK_LOG_PREFIX))
        super().__init__(**kwargs)

    def runQuantum(
        self,
        butler_qc: QuantumContext,
        input_refs: InputQuantizedConnection,
        output_refs: OutputQuantizedConnection,
    ) -> None:
        """Read the catalog file's URI, write the CSV file and put it.

        Parameters
        ----------
        butler_qc : `lsst.pipe.base.QuantumContext`
            Gets the catalog's URI, puts the CSV file.
        input_refs : `lsst.pipe.base.InputQuantizedConnection`
            The catalog.
        output_refs : `lsst.pipe.base.OutputQuantizedConnection`
            The CSV file.
        """
        uri: ResourcePath = butler_qc.get(input_refs.catalog)
        with tempfile.TemporaryDirectory(prefix="butlerfs-bright-") as tmp:
            target = Path(tmp, "bright.csv")
            with uri.as_local() as local:
                count = self.write_brightest(local.ospath, target)
            with put_source_extension(target) as source:
                butler_qc.put(source, output_refs.bright)
        self.log.info("Kept the %d brightest sources of %s", count, uri.basename())

    def write_brightest(self, catalog: str, target: Path) -> int:
        """Write the brightest rows of ``catalog`` (a FITS table) to ``target`` (CSV).

        Parameters
        ----------
        catalog : `str`
            Path of the FITS catalog (first table extension).
        target : `pathlib.Path`
            CSV file to write, with a header row.

        Returns
        -------
        count : `int`
            Rows written.
        """
        columns = [c.strip() for c in self.config.columns.split(",") if c.strip()]
        with fits.open(catalog) as hdul:
            table: Any = next(h.data for h in hdul if isinstance(h, fits.BinTableHDU))
            order = np.argsort(-np.asarray(table[self.config.fluxColumn], dtype=float))
            rows = [[table[c][i].item() for c in columns] for i in order[: self.config.maxSources]]
        with open(target, "w", newline="") as stream:
            writer = csv.writer(stream)
            writer.writerow(columns)
            writer.writerows(rows)
        return len(rows)
