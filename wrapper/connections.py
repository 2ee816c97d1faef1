"""Connections of the wrapper PipelineTask, built from its config.

A user declares the task's quantum dimensions and its inputs, prerequisite inputs and
outputs in config (pipeline YAML); `ExternalProgramConnections` turns them into connections
when pipe_base instantiates it (``setattr(self, name, cT.Input(...))``), so no Python is
written per program.

* Inputs and prerequisites are read with ``deferLoad=True``: the task asks only for the
  artifact's URI, so their storage class must be the one registered in the repository
  (``ExposureF`` for ``calexp``; default ``ButlerfsFile``, what an upstream wrapper task
  writes) and nothing is ever read into Python (no afw needed).
* Outputs are ``ButlerfsFile`` datasets (`butlerfs.formatter`): ``get`` returns the
  artifact's URI, ``put`` copies a file in.
* Connection dimensions default to the task's; prerequisites such as calibrations name
  their own (``instrument,detector`` for a bias).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from lsst.pipe.base import PipelineTaskConnections
from lsst.pipe.base import connectionTypes as cT

from butlerfs.formatter import STORAGE_CLASS_NAME

if TYPE_CHECKING:
    from .config import ExternalProgramConfig

__all__ = ["ExternalProgramConnections", "parse_dimensions"]


def parse_dimensions(text: str) -> list[str]:
    """Split a dimension list written as one string (``"instrument detector"``).

    Parameters
    ----------
    text : `str`
        Dimension names separated by spaces (pipeline YAML) or commas (Python).

    Returns
    -------
    dimensions : `list` [`str`]
        The names, in order, without empty entries.
    """
    return [name for name in re.split(r"[,\s]+", text) if name]


class ExternalProgramConnections(PipelineTaskConnections, dimensions=()):
    """Connections declared by `ExternalProgramConfig` (see its fields).

    Parameters
    ----------
    config : `ExternalProgramConfig`
        The task's config.
    """

    def __init__(self, *, config: ExternalProgramConfig) -> None:
        self.dimensions.update(config.dimensions)
        calibrations = set(config.calibrations)

        def dims(name: str) -> list[str]:
            if name in config.connectionDimensions:
                return parse_dimensions(config.connectionDimensions[name])
            return list(config.dimensions)

        kinds = (
            (cT.Input, "Input", config.inputs),
            (cT.PrerequisiteInput, "Prerequisite input", config.prerequisites),
        )
        for connection, label, mapping in kinds:
            for name, dataset_type in mapping.items():
                setattr(
                    self,
                    name,
                    connection(
                        doc=f"{label} {{{name}}} of the external program.",
                        name=dataset_type,
                        storageClass=config.storageClasses.get(name, STORAGE_CLASS_NAME),
                        dimensions=dims(name),
                        isCalibration=name in calibrations,
                        deferLoad=True,
                    ),
                )
        for name, dataset_type in config.outputs.items():
            setattr(
                self,
                name,
                cT.Output(
                    doc=f"File {config.outputGlobs.get(name, '?')!r} written by the external program.",
                    name=dataset_type,
                    storageClass=STORAGE_CLASS_NAME,
                    dimensions=dims(name),
                ),
            )
