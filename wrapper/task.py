"""The wrapper PipelineTask: one execution of an external program per quantum.

`ExternalProgramTask` runs the program its config names under QuantumGraph control
(``pipetask run``, quantum-backed ``run-qbb``, BPS). Its connections come from config
(`wrapper.config`), so a user writes pipeline YAML only. One ``runQuantum`` is one execution
(WPT-004) through the same per-data-ID core as ``butlerfs run`` (`wrapper.core.run_job`):

1. each input's artifact URI comes from ``butler_qc.get(ref)`` on a ``deferLoad`` connection
   (``handle.butler.getURI(handle.ref)``): nothing is read, so ``ExposureF`` works without
   afw;
2. the inputs are staged (`wrapper.workspace.InputFile`): ``direct`` gives the path at rest
   (a copy when the artifact is not a POSIX file), ``copy`` a private copy, ``uri`` the URI;
3. the program runs in the quantum's workspace (overlay, optional bubblewrap sandbox,
   timeout), console to ``stdout.txt``/``stderr.txt``;
4. each declared output (exactly one file per glob) is stored with ``butler_qc.put`` through
   `butlerfs.formatter.FileArtifactFormatter`, keeping the file's extension, the route that
   also works with a quantum-backed butler (which has no ingest).

A failed execution raises `ExternalProgramError` (or `ExternalProgramTimeoutError`) whose
message holds the stderr tail, so pipe_base marks the quantum failed and the reason is in
the task log; the workspace stays for inspection.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar

from lsst.daf.butler import DataCoordinate, DatasetRef, DeferredDatasetHandle
from lsst.pipe.base import (
    AlgorithmError,
    InputQuantizedConnection,
    OutputQuantizedConnection,
    PipelineTask,
    QuantumContext,
    RepeatableQuantumError,
)

from butlerfs.errors import UsageError
from butlerfs.formatter import put_source_extension
from butlerfs.layout import encode_value

from .config import ExternalProgramConfig
from .core import Job, JobOptions, run_job
from .execute import read_tail
from .inputs import direct_path
from .manifest import Manifest, Status
from .outputs import OutputSpec
from .sandbox import resolve_sandbox
from .workspace import InputFile, OverlayMode, StagingMode, Workspace, probe_overlay, workspace_dir

__all__ = [
    "TASK_LOG_PREFIX",
    "ExternalProgramError",
    "ExternalProgramTask",
    "ExternalProgramTimeoutError",
    "UnsupportedInputError",
]

_LOG = logging.getLogger(__name__)

TASK_LOG_PREFIX = "lsst.butlerfs"
"""Parent of the tasks' loggers (``lsst.butlerfs.<label>``): under ``lsst``, whose INFO messages
``pipetask`` shows and keeps in the ``<label>_log`` datasets by default, as for native tasks."""

STDERR_TAIL_LINES = 20
"""Lines of the program's stderr quoted in the exception of a failed quantum."""


class ExternalProgramError(AlgorithmError):
    """The external program failed: non-zero exit, a signal, a missing output, a failed put.

    A repeatable failure in pipe_base's terms: the program would fail the same way on the
    same inputs (with ``--fail-fast``, ``pipetask`` exits with the code of such errors, 20).

    Parameters
    ----------
    message : `str`
        What happened, with the stderr tail.
    metadata : `dict`
        Status, reason, exit code and workspace, for the task metadata.
    """

    def __init__(self, message: str, metadata: dict[str, str | int | float | bool]) -> None:
        super().__init__(message)
        self._metadata = metadata

    @property
    def metadata(self) -> dict[str, str | int | float | bool]:
        """Status, reason, exit code and workspace of the failed execution."""
        return self._metadata


class ExternalProgramTimeoutError(RuntimeError):
    """The program ran longer than the config's ``timeout`` and was stopped (may be retried)."""


class UnsupportedInputError(RepeatableQuantumError):
    """An input is not one file: a disassembled composite, or a member of a Zip archive."""


class ExternalProgramTask(PipelineTask):
    """Run an external program once per quantum; see `ExternalProgramConfig`.

    Parameters
    ----------
    **kwargs
        Passed to `lsst.pipe.base.PipelineTask`.
    """

    ConfigClass: ClassVar[type[ExternalProgramConfig]] = ExternalProgramConfig
    _DefaultName: ClassVar[str] = "externalProgram"
    config: ExternalProgramConfig

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("log", logging.getLogger(TASK_LOG_PREFIX))
        super().__init__(**kwargs)
        self.template = self.config.template()
        self.program = _program_label(self.config)
        self.output_specs = [
            OutputSpec(name, self.config.outputGlobs[name], dataset_type)
            for name, dataset_type in self.config.outputs.items()
        ]

    def runQuantum(
        self,
        butler_qc: QuantumContext,
        input_refs: InputQuantizedConnection,
        output_refs: OutputQuantizedConnection,
    ) -> None:
        """Run the program on this quantum's inputs and put its outputs.

        Parameters
        ----------
        butler_qc : `lsst.pipe.base.QuantumContext`
            Gets the inputs' URIs and puts the outputs.
        input_refs : `lsst.pipe.base.InputQuantizedConnection`
            Inputs and prerequisites, by placeholder name.
        output_refs : `lsst.pipe.base.OutputQuantizedConnection`
            Outputs, by name.

        Raises
        ------
        ExternalProgramError
            Raised when the program fails, an output is missing or storing one fails.
        ExternalProgramTimeoutError
            Raised when the program was stopped after ``timeout`` seconds.
        """
        data_id = butler_qc.quantum.dataId
        assert data_id is not None, "a quantum always has a data ID"
        inputs = []
        for name, ref in input_refs:
            assert not isinstance(ref, list | tuple), "inputs are declared with multiple=False"
            inputs.append(self._input_file(name, butler_qc.get(ref)))
        outputs: dict[str, DatasetRef] = {name: getattr(output_refs, name) for name in self.config.outputs}
        workspace = self._workspace(butler_qc, data_id)
        values = dict(data_id.mapping) if data_id.hasFull() else dict(data_id.required)
        job = Job(dict(data_id.required), values, workspace, inputs, self.template, self.output_specs)

        def store(files: Mapping[str, Path]) -> dict[str, str]:
            for name, path in files.items():
                with put_source_extension(path) as uri:
                    butler_qc.put(uri, outputs[name])
            return {name: str(outputs[name].id) for name in files}

        with _cancel_on_signals() as cancel:
            manifest = run_job(job, self._job_options(), store, cancel)
        self._record(manifest)
        if manifest.status is Status.OK:
            self.log.info(
                "%s on %s: exit 0 in %.2f s; stored %s",
                self.program,
                _describe(data_id),
                manifest.wall_time or 0.0,
                ", ".join(f"{o.name} ({o.file})" for o in manifest.outputs) or "no outputs",
            )
            self.log.debug("stdout tail:\n%s", read_tail(workspace.stdout))
            if self.config.keepWorkspace:
                self.log.info("Workspace kept: %s", workspace.root)
            else:
                workspace.remove()
            return
        raise self._failure(manifest, workspace, data_id)

    # -- inputs and workspace --------------------------------------------------------------------

    def _input_file(self, name: str, handle: DeferredDatasetHandle) -> InputFile:
        """Describe an input from its deferred handle; nothing is read.

        Raises
        ------
        UnsupportedInputError
            Raised for a disassembled composite, or a member of a Zip archive not passed as a URI.
        """
        ref = handle.ref
        uris = handle.butler.getURIs(ref)
        if uris.primaryURI is None:
            raise UnsupportedInputError(
                f"input {name} ({ref.datasetType.name} {_describe(ref.dataId)}) is stored as one file per "
                f"component ({', '.join(sorted(uris.componentURIs))}): the task needs one file per dataset"
            )
        uri = str(uris.primaryURI)
        mode = self.config.staging_mode(name)
        if "#zip-path=" in uri and mode is not StagingMode.URI:
            raise UnsupportedInputError(
                f"input {name} ({ref.datasetType.name} {_describe(ref.dataId)}) is a member of a Zip "
                f"archive ({uri}): stage it as 'uri', or read it through a butlerfs mount (butlerfs run)"
            )
        path: str | None = None
        if mode is StagingMode.DIRECT:
            path = direct_path(uri)
            if path is None:
                self.log.verbose("Input %s (%s) is not a POSIX file: copied into the workspace", name, uri)
                mode = StagingMode.COPY
        elif mode is StagingMode.COPY:
            path = direct_path(uri)
        return InputFile(
            name, mode, _file_name(uri), uri, path, dataset_id=str(ref.id), dataset_type=ref.datasetType.name
        )

    def _workspace(self, butler_qc: QuantumContext, data_id: DataCoordinate) -> Workspace:
        """Return this quantum's workspace: under ``workdir``, or a new temporary directory."""
        label = self.getName()
        if not self.config.workdir:
            return Workspace(tempfile.mkdtemp(prefix=f"butlerfs-{label}-"))
        run = next(ref.run for refs in butler_qc.quantum.outputs.values() for ref in refs)
        top = Path(self.config.workdir, *(encode_value(p) for p in run.split("/") if p), label)
        return Workspace(workspace_dir(top.absolute(), data_id.required.items()))

    def _job_options(self) -> JobOptions:
        """How to run: sandbox and overlay probed once per process (where workspaces live)."""
        try:
            sandbox = resolve_sandbox(self.config.sandbox, self.config.network)
        except UsageError as err:
            raise RuntimeError(f"{self.getName()}: {err}") from None
        env = None
        if self.config.environment:
            env = {**os.environ, **self.config.environment_variables()}
        return JobOptions(
            overlay=_probe_overlay(self.config.workdir or tempfile.gettempdir(), self.config.overlay),
            sandbox=sandbox,
            network=self.config.network,
            timeout=self.config.timeout,
            kill_grace=self.config.killGrace,
            env=env,
        )

    # -- outcome ---------------------------------------------------------------------------------

    def _record(self, manifest: Manifest) -> None:
        """Put the execution's facts into the task metadata (``<label>_metadata``)."""
        facts: dict[str, Any] = {
            "status": str(manifest.status),
            "reason": manifest.reason,
            "argv": " ".join(manifest.argv),
            "overlay": manifest.overlay or "",
            "sandbox": bool(manifest.sandbox),
        }
        for key in ("exit_code", "wall_time", "cpu_user", "cpu_system", "peak_rss"):
            value = getattr(manifest, key)
            if value is not None:
                facts[key] = value
        for key, value in facts.items():
            self.metadata[key] = value

    def _failure(self, manifest: Manifest, workspace: Workspace, data_id: DataCoordinate) -> BaseException:
        """Build the exception of a failed execution, quoting the stderr tail."""
        if manifest.status is Status.INTERRUPTED:
            return KeyboardInterrupt(manifest.reason)
        tail = _tail_lines(workspace.stderr, STDERR_TAIL_LINES)
        message = f"{self.program} on {_describe(data_id)}: {manifest.reason}"
        if tail:
            message += f"\nstderr (last {len(tail)} lines):\n" + "\n".join(f"    {line}" for line in tail)
        message += f"\nworkspace kept: {workspace.root}"
        if manifest.status is Status.TIMEOUT:
            return ExternalProgramTimeoutError(message)
        metadata: dict[str, str | int | float | bool] = {
            "status": str(manifest.status),
            "reason": manifest.reason,
            "workspace": str(workspace.root),
            "stderr_tail": "\n".join(tail),
        }
        if manifest.exit_code is not None:
            metadata["exit_code"] = manifest.exit_code
        return ExternalProgramError(message, metadata)


def _program_label(config: ExternalProgramConfig) -> str:
    """Name the program in messages: its file name, or the start of a shell script."""
    if config.shell:
        script = " ".join(config.command.split())
        return f"sh -c '{script[:40]}{'...' if len(script) > 40 else ''}'"
    return os.path.basename(config.arguments()[0])


def _describe(data_id: DataCoordinate) -> str:
    return " ".join(f"{k}={v}" for k, v in data_id.required.items())


def _file_name(uri: str) -> str:
    """Return the artifact's file name (a zip member's own name)."""
    base, _, member = uri.partition("#zip-path=")
    name = member or urllib.parse.unquote(urllib.parse.urlsplit(base).path)
    return name.rsplit("/", 1)[-1]


def _tail_lines(path: Path, count: int) -> list[str]:
    text = read_tail(path, 4000)
    lines = text.splitlines()
    if len(text.encode()) >= 4000 and lines:
        lines = lines[1:]  # the first one is cut
    return [line.rstrip() for line in lines if line.strip()][-count:]


@functools.cache
def _probe_overlay(directory: str, wanted: str) -> OverlayMode:
    """Find the overlay mode that works where workspaces live, once per process."""
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".butlerfs-probe-") as scratch:
        mode, problems = probe_overlay(scratch, wanted)
    if problems:
        _LOG.debug("Overlay mode %s in %s (%s)", mode, directory, problems)
    return mode


@contextlib.contextmanager
def _cancel_on_signals() -> Iterator[threading.Event]:
    """Stop the program on ``SIGINT``/``SIGTERM``, then deliver the signal as before.

    The program runs in its own session, so a signal to the task's process does not reach
    it; without this a Ctrl-C or a batch system's ``SIGTERM`` would leave it running. In a
    thread other than the main one, signals cannot be caught: the event is never set.
    """
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel
        return
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        cancel.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield cancel
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
    if received:
        signal.raise_signal(received[0])
