"""Run one execution (one data ID) from staged inputs to stored outputs.

This is the part a PipelineTask reuses: it knows nothing of the command line or of how the
inputs were found. Give it the inputs (`InputFile`), the command template, the declared
outputs and a function that stores the matched files; it returns the `Manifest`, written
into the workspace.

Steps: stage the inputs and mount the overlay (a kernel overlay is mounted by the program's
reaper, in the program's own mount namespace); render the command; run it (in the sandbox if
asked) with its console going to ``stdout.txt``/``stderr.txt``; unmount; list what it created
or changed; match the declared outputs (exactly one file each); claim them (regular files of
the workspace only, moved out of the program's reach); store them all at once. A non-zero
exit, a signal, the timeout, a missing or unsafe output, a modified ``direct`` input, a full
workspace or a failed store make the data ID fail; its workspace stays. When ``cancel`` is set
(Ctrl-C) the program is stopped and nothing is stored.

``direct`` inputs are the repository's own files: each is fingerprinted before and after the
program (identity, size, modification and change times, and a hash of its first and last
MiB), so a program that edits one in place fails its data ID instead of changing the
repository silently.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
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
from .outputs import MissingOutputError, OutputSpec, claim_outputs, match_outputs, release_outputs
from .sandbox import bwrap_argv
from .template import CommandTemplate
from .workspace import InputFile, OverlayMode, Staging, StagingMode, Workspace, out_of_space_message

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


_EDGE = 1 << 20
"""Bytes hashed at each end of a ``direct`` input."""

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _fingerprint(path: str) -> tuple[object, ...]:
    """Identity, size, times and a hash of both ends of a file; ``("missing",)`` if it is gone."""
    try:
        with open(path, "rb") as stream:
            st = os.fstat(stream.fileno())
            digest = hashlib.blake2b(stream.read(_EDGE), digest_size=16)
            if st.st_size > _EDGE:
                stream.seek(max(_EDGE, st.st_size - _EDGE))
                digest.update(stream.read(_EDGE))
    except OSError as err:
        return ("missing", err.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, digest.hexdigest())


def _direct_fingerprints(staging: Staging) -> dict[str, tuple[object, ...]]:
    return {s.name: _fingerprint(s.given) for s in staging.inputs if s.mode is StagingMode.DIRECT}


def _modified_inputs(staging: Staging, before: dict[str, tuple[object, ...]]) -> str:
    """Return the reason a data ID fails for a ``direct`` input the program changed, or ``""``."""
    for item in staging.inputs:
        if item.name in before and _fingerprint(item.given) != before[item.name]:
            return (
                f"input {item.name} ({item.dataset_type} {item.dataset_id}): the program modified the "
                f"repository artifact {item.given}; stage it as a copy ({item.name}=TYPE:copy) or run "
                "it in the sandbox"
            )
    return ""


def _is_full(ws: Workspace) -> bool:
    """Whether the workspace's filesystem has (next to) no space or inodes left."""
    try:
        st = os.statvfs(ws.root)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _EDGE or (st.f_files > 0 and st.f_favail == 0)


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
    before: dict[str, tuple[object, ...]] = {}
    try:
        with ws.staged(job.inputs, options.overlay) as staging:
            before = _direct_fingerprints(staging)
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
                    overlay=staging.kernel_options,
                )
    except OSError as err:
        if err.errno in _NO_SPACE:
            manifest.reason = out_of_space_message(ws.root)
        elif isinstance(err, FileNotFoundError | PermissionError) and not err.filename:
            manifest.reason = str(err)
        else:
            manifest.reason = f"{type(err).__name__}: {err}"
        _LOG.warning("Data ID %s could not run: %s", job.data_id, manifest.reason)
    except (ValueError, UsageError) as err:
        manifest.reason = f"{type(err).__name__}: {err}"
        _LOG.warning("Data ID %s could not run: %s", job.data_id, manifest.reason)
    if result is not None:
        manifest.exit_code, manifest.signal = result.exit_code, result.signal
        manifest.wall_time, manifest.peak_rss = result.wall_time, result.peak_rss or None
        manifest.cpu_user, manifest.cpu_system = result.cpu_user, result.cpu_system
        manifest.killed = result.killed
        if result.ok:
            manifest.status, manifest.reason = Status.OK, ""
        else:
            manifest.status, manifest.reason = _describe_failure(result, options, ws.stderr)
            if _is_full(ws):
                manifest.reason = f"{out_of_space_message(ws.root)}: {manifest.reason}"
    if staging is not None:
        modified = _modified_inputs(staging, before)
        if modified:
            manifest.status, manifest.reason = Status.FAILED, modified
            _LOG.error("Data ID %s: %s", job.data_id, modified)
        try:
            changed = ws.changed_files(staging)
            matched: dict[str, str] = {}
            if manifest.status is Status.OK and job.outputs:
                matched = _harvest(job, manifest, changed, ws, staging, store, cancel)
            manifest.undeclared = [path for path in changed if path not in matched.values()]
        except OSError as err:
            if err.errno not in _NO_SPACE:
                raise
            manifest.status, manifest.reason = Status.FAILED, out_of_space_message(ws.root)
    manifest.finished = now_iso()
    try:
        manifest.write(ws.manifest)
    except OSError as err:
        if err.errno not in _NO_SPACE:
            raise
        _LOG.error(
            "Data ID %s: %s; its manifest could not be written", job.data_id, out_of_space_message(ws.root)
        )
    return manifest


def _harvest(
    job: Job,
    manifest: Manifest,
    changed: Sequence[str],
    ws: Workspace,
    staging: Staging,
    store: StoreOutputs | None,
    cancel: threading.Event | None,
) -> dict[str, str]:
    """Match, claim and store the outputs; on failure set the manifest's status and reason."""
    assert store is not None
    root = ws.changed_root(staging)
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
    try:
        files = claim_outputs(root, matched, ws.claimed)
    except MissingOutputError as err:
        manifest.status, manifest.reason = Status.FAILED, str(err)
        _LOG.error("Data ID %s: %s", job.data_id, err)
        return {}
    try:
        ids = store(files)
    except Exception as err:  # the Butler's errors are many; none may stop the other data IDs
        _LOG.warning("Storing the outputs of %s failed: %s", job.data_id, err, exc_info=_LOG.isEnabledFor(10))
        release_outputs((root / matched[name], path) for name, path in files.items() if path.exists())
        manifest.status, manifest.reason = Status.FAILED, f"storing outputs failed, none stored: {err}"
        return {}
    types = {spec.name: spec.dataset_type for spec in job.outputs}
    manifest.outputs = [OutputRecord(name, types[name], ids[name], matched[name]) for name in sorted(matched)]
    return matched
