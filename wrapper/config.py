"""Config of the wrapper PipelineTask: everything a user writes in pipeline YAML.

A SExtractor task, for instance::

    tasks:
      sextractor:
        class: wrapper.task.ExternalProgramTask
        config:
          dimensions: [instrument, visit, detector]
          inputs: {calexp: calexp}
          storageClasses: {calexp: ExposureF}
          outputs: {catalog: sextractorCatalog}
          outputGlobs: {catalog: cat.fits}
          command: source-extractor '{calexp}[1]' -CATALOG_NAME cat.fits ...

Every field is flat (`~lsst.pex.config.DictField` of strings, `~lsst.pex.config.ListField`),
because pipeline YAML cannot set a nested dictionary of a ``ConfigDictField``. pipe_base also
reads each string of a pipeline's ``config:`` as a Python literal when it is one (``{raw}``
becomes a set, ``a, b`` a tuple, ``1`` an int), so the command is one string split like a
shell line (never a literal), connection dimensions are space-separated and environment
variables are ``NAME=VALUE`` entries. See ``docs/PIPELINE.md``.
"""

from __future__ import annotations

import re
import shlex

from lsst.pex.config import ChoiceField, DictField, Field, ListField
from lsst.pipe.base import PipelineTaskConfig

from .connections import ExternalProgramConnections, parse_dimensions
from .template import DATA_ID_PREFIX, WORKDIR, CommandTemplate, TemplateError
from .workspace import StagingMode

__all__ = ["QUANTUM_STAGING_MODES", "ExternalProgramConfig"]

QUANTUM_STAGING_MODES = (StagingMode.DIRECT, StagingMode.COPY, StagingMode.URI)
"""Staging modes inside a quantum (``mount`` needs a butlerfs mount, which a quantum has not)."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names a connection cannot take: the placeholders, and attributes of PipelineTaskConnections.
_RESERVED = frozenset(
    {
        WORKDIR,
        "dataId",
        "config",
        "dimensions",
        "inputs",
        "outputs",
        "prerequisiteInputs",
        "initInputs",
        "initOutputs",
        "allConnections",
        "defaultTemplates",
        "deprecatedTemplates",
    }
)
_AUTOMATIC_SUFFIXES = ("_log", "_metadata", "_config")


class ExternalProgramConfig(PipelineTaskConfig, pipelineConnections=ExternalProgramConnections):
    """Config of `wrapper.task.ExternalProgramTask`."""

    dimensions = ListField[str](
        doc="Dimensions of the task's quanta: one execution of the program per data ID "
        "(e.g. [instrument, visit, detector]).",
        default=[],
    )
    inputs = DictField[str, str](
        doc="Regular inputs: placeholder name -> dataset type. One dataset per quantum each.",
        keytype=str,
        itemtype=str,
        default={},
    )
    prerequisites = DictField[str, str](
        doc="Prerequisite inputs (calibrations, reference files): placeholder name -> dataset type. "
        "They do not constrain which quanta exist; a missing one fails graph building.",
        keytype=str,
        itemtype=str,
        default={},
    )
    outputs = DictField[str, str](
        doc="Outputs: name -> dataset type (storage class ButlerfsFile, the quantum's data ID).",
        keytype=str,
        itemtype=str,
        default={},
    )
    storageClasses = DictField[str, str](
        doc="Storage class of an input or prerequisite as registered in the repository (e.g. "
        "calexp: ExposureF); default ButlerfsFile. Nothing is read, so afw is never needed.",
        keytype=str,
        itemtype=str,
        default={},
    )
    connectionDimensions = DictField[str, str](
        doc="Dimensions of a connection whose dataset type does not have the task's dimensions, "
        "as one space-separated string (e.g. bias: instrument detector).",
        keytype=str,
        itemtype=str,
        default={},
    )
    calibrations = ListField[str](
        doc="Names of the inputs and prerequisites whose dataset types are calibrations "
        "(found through CALIBRATION collections by the quantum's timespan).",
        default=[],
    )
    command = Field[str](
        doc="The program and its arguments as one line, split like a POSIX shell does (quotes "
        "group, nothing is expanded), with placeholders: {NAME} (an input's path or URI), "
        "{dataId.KEY} (a data ID value), {workdir} (the program's working directory); "
        "{{ and }} for literal braces. With shell=True, a /bin/sh script.",
        default="",
    )
    shell = Field[bool](
        doc="Run the command as one /bin/sh -c script; values reach it as positional parameters.",
        default=False,
    )
    outputGlobs = DictField[str, str](
        doc="Output name -> glob relative to the working directory; exactly one file the program "
        "created or changed must match each.",
        keytype=str,
        itemtype=str,
        default={},
    )
    staging = DictField[str, str](
        doc="Input name -> how the program gets it: 'direct' (default: the artifact's path at rest; "
        "a copy when the datastore is not POSIX), 'copy' (a private copy in the working "
        "directory), 'uri' (the artifact's URI as a string).",
        keytype=str,
        itemtype=str,
        default={},
    )
    sandbox = ChoiceField[str](
        doc="Run the program under bubblewrap: read-only system and inputs, writable working "
        "directory, own PID namespace.",
        allowed={
            "auto": "when bubblewrap works here",
            "on": "required: fail if bubblewrap does not work",
            "off": "never",
        },
        default="auto",
    )
    network = Field[bool](doc="Give the program network access (False needs the sandbox).", default=True)
    timeout = Field[float](
        doc="Seconds before the program's process tree is stopped and the quantum fails.",
        default=None,
        optional=True,
    )
    killGrace = Field[float](doc="Seconds between SIGTERM and SIGKILL when stopping.", default=5.0)
    environment = ListField[str](
        doc="NAME=VALUE entries set in the program's environment, on top of the task's.",
        default=[],
    )
    overlay = ChoiceField[str](
        doc="How the writable working directory is made (see docs/RUN.md).",
        allowed={
            "auto": "the first that works of kernel, fuse, links",
            "kernel": "kernel overlayfs (root or a user namespace)",
            "fuse": "fuse-overlayfs",
            "links": "a plain directory of links and copies",
        },
        default="auto",
    )
    workdir = Field[str](
        doc="Directory holding the workspaces, as WORKDIR/RUN/LABEL/DATA_ID/; empty: a new "
        "temporary directory per quantum.",
        default="",
    )
    keepWorkspace = Field[bool](
        doc="Keep the workspace of a successful quantum (a failed one's is always kept).",
        default=False,
    )

    def connection_names(self) -> list[str]:
        """Return the names of inputs, prerequisites and outputs, in that order."""
        return [*self.inputs, *self.prerequisites, *self.outputs]

    def staging_mode(self, name: str) -> StagingMode:
        """Return how input ``name`` is staged (default ``direct``)."""
        return StagingMode(self.staging.get(name, StagingMode.DIRECT.value))

    def arguments(self) -> list[str]:
        """Return the command's arguments: ``command`` split like a shell (one script with ``shell``).

        Raises
        ------
        TemplateError
            Raised for unbalanced quotes.
        """
        if self.shell:
            return [self.command]
        try:
            return shlex.split(self.command)
        except ValueError as err:
            raise TemplateError(f"cannot split {self.command!r} into arguments: {err}") from None

    def template(self) -> CommandTemplate:
        """Return the parsed command template.

        Raises
        ------
        TemplateError
            Raised for unbalanced quotes or braces, or an empty command.
        """
        return CommandTemplate.parse(self.arguments(), shell=self.shell)

    def environment_variables(self) -> dict[str, str]:
        """Return ``environment`` as a mapping."""
        return dict(entry.split("=", 1) for entry in self.environment)

    def validate(self) -> None:
        """Check the declarations against each other and the command's placeholders.

        Raises
        ------
        ValueError
            Raised for the first problem found, in a sentence naming the field.
        """
        super().validate()
        problems = self._problems()
        if problems:
            raise ValueError(f"{type(self).__name__}: {'; '.join(problems)}")

    def _problems(self) -> list[str]:
        out: list[str] = []
        names = self.connection_names()
        readable = [*self.inputs, *self.prerequisites]
        if not self.command or not self.command.strip():
            out.append("command is empty: give the program and its arguments")
        out += [
            f"environment: {entry!r} is not NAME=VALUE"
            for entry in self.environment
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", entry, re.DOTALL)
        ]
        for name in names:
            if not _NAME.fullmatch(name) or name in _RESERVED:
                out.append(f"{name!r} cannot name a connection (a Python identifier, not {WORKDIR}/dataId)")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            out.append(f"{', '.join(duplicates)} declared more than once among inputs/prerequisites/outputs")
        for name, dataset_type in self.outputs.items():
            if dataset_type.endswith(_AUTOMATIC_SUFFIXES):
                out.append(
                    f"output {name}: dataset type {dataset_type} ends like the task's own "
                    f"{'/'.join(_AUTOMATIC_SUFFIXES)} datasets: choose another name"
                )
            if name not in self.outputGlobs:
                out.append(f"output {name} has no outputGlobs entry (the file it is)")
        for field, allowed, what in (
            ("outputGlobs", self.outputs, "an output"),
            ("storageClasses", readable, "an input or prerequisite"),
            ("staging", readable, "an input or prerequisite"),
            ("connectionDimensions", names, "a connection"),
        ):
            out += [f"{field}: {key} is not {what}" for key in getattr(self, field) if key not in allowed]
        out += [
            f"calibrations: {name} is not an input or prerequisite"
            for name in self.calibrations
            if name not in readable
        ]
        for name, glob in self.outputGlobs.items():
            if not glob or glob.startswith("/") or ".." in glob.split("/"):
                out.append(f"outputGlobs: {name}: {glob!r} must be relative to the working directory")
        for name, text in self.connectionDimensions.items():
            if not parse_dimensions(text):
                out.append(f"connectionDimensions: {name}: no dimensions in {text!r}")
        modes = ", ".join(m.value for m in QUANTUM_STAGING_MODES)
        for name, mode in self.staging.items():
            if mode == StagingMode.MOUNT.value:
                out.append(
                    f"staging: {name}: 'mount' needs a butlerfs mount, which a quantum has not ({modes})"
                )
            elif mode not in {m.value for m in QUANTUM_STAGING_MODES}:
                out.append(f"staging: {name}: unknown mode {mode!r} (one of {modes})")
        if not self.network and self.sandbox == "off":
            out.append("network=False needs the sandbox: set sandbox to auto or on")
        if self.timeout is not None and self.timeout <= 0:
            out.append("timeout must be positive")
        if self.command and self.command.strip():
            try:
                template = self.template()
            except TemplateError as err:
                out.append(f"command: {err}")
            else:
                for placeholder in sorted(template.placeholders):
                    if placeholder == WORKDIR or placeholder.startswith(DATA_ID_PREFIX):
                        continue
                    if placeholder not in readable:
                        defined = ", ".join("{" + n + "}" for n in [*readable, WORKDIR, "dataId.KEY"])
                        out.append(
                            f"command: undefined placeholder {{{placeholder}}}: defined are {defined} "
                            "(write {{ and }} for literal braces)"
                        )
        return out
