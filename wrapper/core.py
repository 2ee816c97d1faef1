"""Run one execution (one data ID) from staged inputs to stored outputs.

This is the part a PipelineTask reuses: it knows nothing of the command line or of how the
inputs were found. Give it the inputs (`InputFile`), the command template, the declared
outputs and a function that stores the matched files; it returns the `Manifest`, written
into the workspace.

Steps: stage the inputs and mount the overlay; render the command; run it (in the sandbox if
asked) with its console going to ``stdout.txt``/``stderr.txt``; unmount; list what it created
or changed; match the declared outputs (exactly one file each); store them all at once. A
non-zero exit, a signal, the timeout, a missing output or a failed store make the data ID
fail; its workspace stays. When ``cancel`` is set (Ctrl-C) the program is stopped and nothing
is stored.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from butlerfs.errors import UsageError

from .execute import ExecResult, execute, read_tail
from .manifest import InputRecord, Manifest, OutputRecord, Status, now_iso
from .outputs import MissingOutputError, OutputSpec, match_outputs
from .sandbox import bwrap_argv
from .template import CommandTemplate
from .workspace import InputFile, OverlayMode, Staging, Workspace

__all__ = ["Job", "JobOptions", "StoreOutputs", "run_job"]

_LOG = logging.getLogger(__name__)

StoreOutputs = Callable[[Mapping[str, Path]], Mapping[str, str]]
"""Stores the file of each output name, all or none; returns each new dataset's ID."""


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """How executions run; the same for every data ID of a run.

    Attributes
    ----------
    overlay : `OverlayMode`
        Overlay mode to try first.
    sandbox : `bool`
        Run under bubblewrap.
    network : `bool`
        Give the program network access (without it, the sandbox unshares the network).
    timeout : `float` or `None`
        Seconds before the program is stopped.
    kill_grace : `float`
        Seconds between ``SIGTERM`` and ``SIGKILL``.
    env : `~collections.abc.Mapping` [`str`, `str`] or `None`
        The program's environment; default the runner's.
    """

    overlay: OverlayMode = OverlayMode.AUTO
    sandbox: bool = False
    network: bool = True
    timeout: float | None = None
    kill_grace: float = 5.0
    env: Mapping[str, str] | None = None


@dataclasses.dataclass
class Job:
    """One execution.

    Attributes
    ----------
    data_id : `dict` [`str`, `int` or `str`]
        Required dimensions and values (recorded in the manifest).
    values : `dict` [`str`, `int` or `str`]
        Every value ``{dataId.KEY}`` may use (implied dimensions included).
    workspace : `Workspace`
        Its workspace.
    inputs : `list` [`InputFile`]
        Its inputs.
    template : `CommandTemplate`
        The command.
    outputs : `list` [`OutputSpec`]
        The declared outputs.
    """

    data_id: dict[str, Any]
    values: dict[str, Any]
    workspace: Workspace
    inputs: list[InputFile]
    template: CommandTemplate
    outputs: list[OutputSpec] = dataclasses.field(default_factory=list)


def _input_records(staging: Staging) -> list[InputRecord]:
    return [
        InputRecord(s.name, s.dataset_type, s.dataset_id, s.uri, str(s.mode), s.given, s.note)
        for s in staging.inputs
    ]


def _resolve_program(argv: list[str]) -> list[str]:
    """Make the program an absolute path (a relative one is relative to the runner's cwd)."""
    program = argv[0]
    if "/" in program:
        return [os.path.abspath(program), *argv[1:]]
    found = shutil.which(program)
    if found is None:
        raise FileNotFoundError(f"program not found: {program} (not on PATH)")
    return [found, *argv[1:]]


def _describe_failure(result: ExecResult, options: JobOptions, stderr: Path) -> tuple[Status, str]:
    if result.interrupted:
        return Status.INTERRUPTED, "interrupted (Ctrl-C): the program was stopped"
    if result.timed_out:
        return Status.TIMEOUT, f"timed out after {options.timeout:g} s: the process tree was stopped"
    tail = [line for line in read_tail(stderr, 1000).strip().splitlines() if line.strip()]
    last = f": {tail[-1].strip()}" if tail else ""
    if result.signal is not None:
        return Status.FAILED, f"killed by {signal.Signals(result.signal).name}{last}"
    return Status.FAILED, f"exit status {result.exit_code}{last}"


def run_job(
    job: Job,
    options: JobOptions,
    store: StoreOutputs | None = None,
    cancel: threading.Event | None = None,
) -> Manifest:
    """Run one execution and store its outputs.

    Parameters
    ----------
    job : `Job`
        What to run.
    options : `JobOptions`
        How to run it.
    store : `StoreOutputs`, optional
        Stores the matched outputs; required when ``job.outputs`` is not empty.
    cancel : `threading.Event`, optional
        Set it to stop the program; nothing is stored then.

    Returns
    -------
    manifest : `Manifest`
        The outcome, also written to the workspace's ``manifest.json``.
    """
    if job.outputs and store is None:
        raise ValueError("a job with outputs needs a store function")
    ws = job.workspace
    manifest = Manifest(
        data_id=dict(job.data_id),
        status=Status.FAILED,
        workspace=str(ws.root),
        sandbox=options.sandbox,
        network=options.network,
        started=now_iso(),
    )
    result: ExecResult | None = None
    staging: Staging | None = None
    try:
        with ws.staged(job.inputs, options.overlay) as staging:
            manifest.overlay = str(staging.overlay)
            manifest.inputs = _input_records(staging)
            argv = job.template.render(staging.values, job.values, str(ws.merged))
            argv = _resolve_program(argv)
            manifest.argv = argv
            full = argv
            if options.sandbox:
                tmpdir = ws.root / "tmp"
                tmpdir.mkdir(exist_ok=True)
                full = bwrap_argv(
                    argv,
                    cwd=str(ws.merged),
                    writable=[str(ws.merged)],
                    tmpdir=str(tmpdir),
                    network=options.network,
                )
                manifest.sandbox_argv = full[: len(full) - len(argv)]
            if cancel is not None and cancel.is_set():
                manifest.status, manifest.reason = (
                    Status.INTERRUPTED,
                    "interrupted (Ctrl-C) before it started",
                )
            else:
                result = execute(
                    full,
                    cwd=ws.merged,
                    stdout=ws.stdout,
                    stderr=ws.stderr,
                    env=options.env,
                    timeout=options.timeout,
                    cancel=cancel,
                    kill_grace=options.kill_grace,
                )
    except (OSError, ValueError, UsageError) as err:
        manifest.reason = (
            f"{type(err).__name__}: {err}" if not isinstance(err, FileNotFoundError) else str(err)
        )
        _LOG.warning("Data ID %s could not run: %s", job.data_id, manifest.reason)
    if result is not None:
        manifest.exit_code, manifest.signal = result.exit_code, result.signal
        manifest.wall_time, manifest.peak_rss = result.wall_time, result.peak_rss
        manifest.cpu_user, manifest.cpu_system = result.cpu_user, result.cpu_system
        if result.ok:
            manifest.status, manifest.reason = Status.OK, ""
        else:
            manifest.status, manifest.reason = _describe_failure(result, options, ws.stderr)
    if staging is not None:
        changed = ws.changed_files(staging)
        matched: dict[str, str] = {}
        if manifest.status is Status.OK and job.outputs:
            matched = _harvest(job, manifest, changed, ws.changed_root(staging), store, cancel)
        manifest.undeclared = [path for path in changed if path not in matched.values()]
    manifest.finished = now_iso()
    manifest.write(ws.manifest)
    return manifest


def _harvest(
    job: Job,
    manifest: Manifest,
    changed: Sequence[str],
    root: Path,
    store: StoreOutputs | None,
    cancel: threading.Event | None,
) -> dict[str, str]:
    """Match and store the outputs; on failure set the manifest's status and reason."""
    assert store is not None
    try:
        matched = match_outputs(changed, job.outputs)
    except MissingOutputError as err:
        manifest.status, manifest.reason = Status.FAILED, str(err)
        return {}
    if cancel is not None and cancel.is_set():
        manifest.status, manifest.reason = (
            Status.INTERRUPTED,
            "interrupted (Ctrl-C) before its outputs were stored",
        )
        return {}
    files = {name: root / rel for name, rel in matched.items()}
    try:
        ids = store(files)
    except Exception as err:  # the Butler's errors are many; none may stop the other data IDs
        _LOG.warning("Storing the outputs of %s failed: %s", job.data_id, err, exc_info=_LOG.isEnabledFor(10))
        manifest.status, manifest.reason = Status.FAILED, f"storing outputs failed, none stored: {err}"
        return {}
    types = {spec.name: spec.dataset_type for spec in job.outputs}
    manifest.outputs = [OutputRecord(name, types[name], ids[name], matched[name]) for name in sorted(matched)]
    return matched
