"""``butlerfs run``: an external program once per data ID, outputs harvested into the Butler.

`plan_run` checks everything that can be wrong before anything runs (arguments, repository,
collections, dataset types, placeholders, the program, the sandbox, the overlay) and finds
the executions; `execute_plan` runs them, ``jobs`` at a time, each through
`wrapper.core.run_job`, inside one butlerfs mount that serves the ``mount`` and ``copy``
inputs. `run` does both.

Resume: a data ID is skipped when its outputs are all in the output RUN already (a run with
no outputs: when its manifest says ``ok``); one that failed before is skipped too unless
``rerun_failed``. Ctrl-C (``SIGINT``, and ``SIGTERM`` while running in the main thread) stops
the running programs, stores nothing half-done, unmounts everything and returns a summary
marked interrupted.

A run holds an exclusive lock on ``WORKDIR/.lock`` (``flock``, released by the kernel when the
run dies) from `plan_run` to the end of `execute_plan`: a second run in the same work
directory is refused at once. Having the lock, `plan_run` clears what a killed run left (its
mount daemon, overlays, the ``.mnt`` mount); the run's mount daemon itself unmounts everything
and exits when the run process dies.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from butlerfs.errors import UsageError
from butlerfs.layout import dataset_path, encode_value
from butlerfs.mounting import Mount, daemons_serving, mount, unmount_under

from .core import Job, JobOptions, run_job
from .harvest import ButlerHarvester, DataIdKey
from .inputs import (
    InputSpec,
    Unit,
    check_collections,
    direct_path,
    file_extension,
    find_units,
    get_dataset_type,
    open_butler,
)
from .manifest import Manifest, OutputRecord, Status, now_iso
from .options import RunOptions, TransferMode
from .outputs import OutputSpec
from .sandbox import resolve_sandbox
from .template import CommandTemplate
from .workspace import (
    InputFile,
    OverlayMode,
    StagingMode,
    Workspace,
    free_space,
    out_of_space_message,
    probe_overlay,
    workspace_dir,
)

__all__ = ["Plan", "Result", "RunOptions", "RunSummary", "execute_plan", "plan_run", "run"]

_LOG = logging.getLogger(__name__)

MOUNT_DIR = ".mnt"
"""The butlerfs mount serving the inputs, inside the work directory."""
LOCK_FILE = ".lock"
"""Held (``flock``) by the run using the work directory; holds its PID."""

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclasses.dataclass
class Result:
    """The outcome of one data ID in this run.

    Attributes
    ----------
    manifest : `Manifest`
        What was recorded (for a skipped data ID: its status and reason only).
    done : `bool`
        Whether the data ID is finished (run ok now or before).
    """

    manifest: Manifest
    done: bool

    @property
    def data_id(self) -> dict[str, Any]:
        """The data ID's required dimensions and values (``{"instrument": ..., "visit": ...}``)."""
        return self.manifest.data_id

    @property
    def status(self) -> Status:
        """``ok``, ``failed``, ``timeout``, ``skipped`` or ``interrupted`` (a `str`)."""
        return self.manifest.status

    @property
    def reason(self) -> str:
        """Why the data ID is not ``ok``; empty when it is."""
        return self.manifest.reason

    @property
    def outputs(self) -> dict[str, OutputRecord]:
        """The outputs stored now, by output name (dataset type, dataset ID, file)."""
        return {record.name: record for record in self.manifest.outputs}

    @property
    def exit_code(self) -> int | None:
        """The program's exit status; `None` when it did not run or was killed by a signal."""
        return self.manifest.exit_code

    @property
    def workspace(self) -> str:
        """The data ID's workspace (console output, manifest, undeclared files)."""
        return self.manifest.workspace


@dataclasses.dataclass
class RunSummary:
    """What a run did.

    Iterating over it gives each data ID's `Result`, in data ID order; ``str(summary)`` is
    the table ``butlerfs run`` prints.

    Attributes
    ----------
    workdir : `pathlib.Path`
        The run's work directory.
    results : `list` [`Result`]
        One per data ID, in data ID order.
    overlay : `OverlayMode`
        Overlay mode the probe chose (each manifest records the one used).
    sandbox : `bool`
        Whether programs ran under bubblewrap.
    interrupted : `bool`
        Stopped by Ctrl-C.
    elapsed : `float`
        Seconds spent running (after planning).
    """

    workdir: Path
    results: list[Result]
    overlay: OverlayMode
    sandbox: bool
    interrupted: bool = False
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        """Every data ID is finished and nothing was interrupted."""
        return not self.interrupted and all(r.done for r in self.results)

    def __iter__(self) -> Iterator[Result]:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __str__(self) -> str:
        return "\n".join(self.report())

    def report(self, max_rows: int = 50) -> list[str]:
        """Return the summary table as lines of text.

        Parameters
        ----------
        max_rows : `int`, optional
            With more data IDs than this, only the unfinished ones get a row.

        Returns
        -------
        lines : `list` [`str`]
            A header, one row per data ID (status, exit, wall and CPU time, peak memory,
            outputs stored, reason) and a total line.
        """
        rows = [r for r in self.results if len(self.results) <= max_rows or not r.done]
        table = [("data ID", "status", "exit", "wall", "CPU", "peak RSS", "outputs", "reason")]
        for r in rows:
            m = r.manifest
            cpu = None if m.cpu_user is None else m.cpu_user + (m.cpu_system or 0.0)
            reason = m.reason if len(m.reason) <= 80 else m.reason[:77] + "..."
            table.append(
                (
                    " ".join(f"{k}={v}" for k, v in m.data_id.items() if k != "instrument") or "-",
                    str(m.status),
                    "-" if m.exit_code is None else str(m.exit_code),
                    "-" if m.wall_time is None else f"{m.wall_time:.2f}s",
                    "-" if cpu is None else f"{cpu:.2f}s",
                    "-" if not m.peak_rss else _size(m.peak_rss),
                    str(len(m.outputs)),
                    reason,
                )
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in table]
        if len(rows) < len(self.results):
            lines.append(f"({len(self.results) - len(rows)} finished data IDs not shown)")
        counts = ", ".join(f"{n} {status}" for status, n in sorted(self.counts().items()))
        lines.append(
            f"{len(self.results)} data IDs: {counts} in {self.elapsed:.1f} s (overlay {self.overlay}, "
            f"sandbox {'on' if self.sandbox else 'off'}); workspaces in {self.workdir}"
        )
        return lines

    def counts(self) -> dict[str, int]:
        """Number of data IDs per status."""
        out: dict[str, int] = {}
        for r in self.results:
            out[str(r.manifest.status)] = out.get(str(r.manifest.status), 0) + 1
        return out


@dataclasses.dataclass
class Plan:
    """A checked run, ready to execute: what `plan_run` found."""

    options: RunOptions
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    template: CommandTemplate
    units: list[Unit]
    workdir: Path
    job_options: JobOptions
    harvester: ButlerHarvester | None
    done: set[DataIdKey]
    lock: int | None = None
    """Descriptor holding the work directory's lock; `release` closes it."""

    def release(self) -> None:
        """Release the work directory's lock (`execute_plan` does it when it finishes)."""
        if self.lock is not None:
            os.close(self.lock)
            self.lock = None


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _default_workdir(output_run: str | None) -> Path:
    if output_run:
        return Path("butlerfs-run", *(encode_value(part) for part in output_run.split("/") if part))
    return Path("butlerfs-run", datetime.datetime.now().strftime("%Y%m%dT%H%M%S"))


def _check_program(template: CommandTemplate) -> CommandTemplate:
    """Check that the program exists; make a relative program path absolute."""
    program = template.program
    if program is None:
        return template
    if "/" in program:
        path = os.path.abspath(program)
        if not os.path.isfile(path) or not os.access(path, os.X_OK):
            raise UsageError(f"program not found or not executable: {program}")
        return CommandTemplate.parse([path.replace("{", "{{").replace("}", "}}"), *template.arguments[1:]])
    if shutil.which(program) is None:
        raise UsageError(f"program not found: {program} is not on PATH")
    return template


def _workdir_error(workdir: Path, err: OSError, what: str = "cannot use") -> str:
    """The one-line reason a work directory is unusable."""
    if err.errno in _NO_SPACE:
        return (
            f"the work directory {workdir} ran out of space ({free_space(workdir)} free): "
            "free some space or give another --workdir"
        )
    return f"{what} work directory {workdir}: {err.strerror or err}"


def _lock_workdir(workdir: Path) -> int:
    """Take the work directory's lock; return its descriptor (not inherited by children).

    Raises
    ------
    UsageError
        When another live run holds it, or the lock file cannot be written.
    """
    path = workdir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        raise UsageError(_workdir_error(workdir, err)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = "?"
        with contextlib.suppress(OSError, ValueError):
            holder = str(int(os.pread(fd, 32, 0).decode().strip()))
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UsageError(_workdir_error(workdir, err)) from None
        raise UsageError(
            f"another butlerfs run (pid {holder}) is using work directory {workdir}: "
            "wait for it to finish or give another --workdir"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as err:
        os.close(fd)
        raise UsageError(_workdir_error(workdir, err)) from None
    return fd


def _clear_stale(workdir: Path, wait: float = 30.0) -> None:
    """Clear what a killed run left in ``workdir``: its mount daemon, overlays and ``.mnt``.

    Only called with the lock held, so nothing here belongs to a live run.
    """
    daemons = daemons_serving(str(workdir / MOUNT_DIR))
    cleared = unmount_under(str(workdir))
    # A dead run's daemon may still be cleaning up: it must be gone before this run mounts
    # anything, or it could unmount this run's mounts too.
    processes = []
    for pid in daemons:
        with contextlib.suppress(psutil.Error):
            processes.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(processes, timeout=wait)
    for process in alive:
        _LOG.warning("Mount daemon %d of a previous run did not exit: killing it", process.pid)
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=wait)
    cleared += unmount_under(str(workdir))
    if cleared or daemons:
        names = ", ".join(os.path.relpath(point, workdir) for point in cleared) or "no mount"
        _LOG.warning(
            "Cleared what a killed run left in %s: %d daemon(s), unmounted %s", workdir, len(daemons), names
        )


def plan_run(options: RunOptions) -> Plan:
    """Check a run and find its executions, before anything runs.

    Nothing is written but the work directory and, when outputs are declared, the output
    RUN and the outputs' dataset types (registered when missing).

    Parameters
    ----------
    options : `RunOptions`
        The run.

    Returns
    -------
    plan : `Plan`
        Ready for `execute_plan`.

    Raises
    ------
    UsageError
        For every mistake, with a one-line message.
    """
    inputs = [i if isinstance(i, InputSpec) else InputSpec.parse(i) for i in options.inputs]
    outputs = [o if isinstance(o, OutputSpec) else OutputSpec.parse(o) for o in options.outputs]
    out_names = [o.name for o in outputs]
    if len(set(out_names)) != len(out_names):
        raise UsageError(f"--output names must differ: {', '.join(out_names)}")
    if outputs and not options.output_run:
        raise UsageError("--output needs --output-run RUN: the RUN collection to store outputs in")
    if options.jobs < 1:
        raise UsageError("-j must be at least 1")
    if options.put and TransferMode(options.transfer) is not TransferMode.MOVE:
        _LOG.warning("--transfer is ignored with --put: the formatter copies each file into the datastore")
    template = _check_program(CommandTemplate.parse(options.command, shell=options.shell))
    sandbox = resolve_sandbox(options.sandbox, options.network)
    butler = open_butler(options.repo, writeable=bool(outputs))
    if outputs and not butler.isWriteable():
        raise UsageError(
            f"{options.repo} is read-only (a client/server Butler stores nothing), so --output cannot "
            "store there: drop --output and --output-run (each data ID's files stay in its workspace)"
        )
    collections = check_collections(butler, options.repo, options.collections)
    if inputs:  # placeholders first: the query may take a while
        first_type = get_dataset_type(butler, inputs[0])
        template.validate([i.name for i in inputs], first_type.dimensions.names)
    first, units = find_units(butler, collections, inputs, options.where)
    harvester = None
    if outputs:
        assert options.output_run is not None
        harvester = ButlerHarvester(
            butler, options.output_run, outputs, first.dimensions, put=options.put, transfer=options.transfer
        )
        harvester.check()
    workdir = Path(options.workdir) if options.workdir else _default_workdir(options.output_run)
    workdir = workdir.absolute()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(_workdir_error(workdir, err, "cannot create")) from None
    lock = _lock_workdir(workdir)
    try:
        _clear_stale(workdir)
        wanted = OverlayMode(options.overlay)
        try:
            overlay, problems = probe_overlay(workdir, wanted)
        except OSError as err:
            raise UsageError(_workdir_error(workdir, err)) from None
        if wanted is not OverlayMode.AUTO and overlay is not wanted:
            raise UsageError(
                f"--overlay {wanted} does not work in {workdir}: {problems} "
                "(--overlay auto takes one that does)"
            )
        if problems:
            _LOG.info("Overlay mode %s (%s)", overlay, problems)
        done: set[DataIdKey] = set()
        if harvester is not None:
            harvester.prepare()
            done = harvester.done()
    except BaseException:
        os.close(lock)
        raise
    job_options = JobOptions(
        overlay=overlay,
        sandbox=sandbox,
        network=options.network,
        timeout=options.timeout,
        kill_grace=options.kill_grace,
    )
    return Plan(options, inputs, outputs, template, units, workdir, job_options, harvester, done, lock)


def _skip(plan: Plan, unit: Unit, ws: Workspace) -> Result | None:
    """Return the result of a data ID that need not run, else `None`."""
    if plan.outputs and unit.key in plan.done:
        reason = f"outputs already in {plan.options.output_run}"
        return Result(Manifest(unit.required, Status.SKIPPED, reason, workspace=str(ws.root)), True)
    previous = Manifest.read(ws.manifest)
    if previous is None:
        return None
    if previous.status is Status.OK and not plan.outputs:
        return Result(
            Manifest(unit.required, Status.SKIPPED, "ok in a previous run", workspace=str(ws.root)), True
        )
    if previous.status in (Status.FAILED, Status.TIMEOUT) and not plan.options.rerun_failed:
        reason = f"{previous.status} in a previous run ({previous.reason}); --rerun-failed runs it again"
        return Result(Manifest(unit.required, Status.SKIPPED, reason, workspace=str(ws.root)), False)
    return None


def _find_by_id(directory: str, dataset_id: str) -> str | None:
    """Find the file of a dataset in a mount directory by its ``user.butler.dataset_id``."""
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            with contextlib.suppress(OSError):
                if os.getxattr(path, "user.butler.dataset_id").decode() == dataset_id:
                    return path
    return None


def _input_files(plan: Plan, unit: Unit, mounted: Mount | None) -> list[InputFile]:
    """Where each input of a unit is: in the mount, at rest, or only a URI."""
    files = []
    for spec in plan.inputs:
        ref, uri = unit.refs[spec.name], unit.uris[spec.name]
        ids = dict(dataset_id=str(ref.id), dataset_type=ref.datasetType.name)
        if spec.mode in (StagingMode.MOUNT, StagingMode.COPY):
            assert mounted is not None
            extension = unit.extensions.get(spec.name, file_extension(uri))
            rel = dataset_path(ref.datasetType.name, ref.dataId.required.items(), extension)
            path: str | None = mounted.path(rel)
            assert path is not None
            if not os.path.exists(path):  # several calibrations share the data ID: names carry the UUID
                path = _find_by_id(os.path.dirname(path), str(ref.id))
            if path is None:
                raise FileNotFoundError(f"input {spec.name}: {rel} is not in the butlerfs mount")
            files.append(InputFile(spec.name, spec.mode, os.path.basename(rel), uri, path, **ids))
        elif spec.mode is StagingMode.DIRECT:
            local = direct_path(uri)
            assert local is not None
            files.append(InputFile(spec.name, spec.mode, os.path.basename(local), uri, local, **ids))
        else:
            files.append(InputFile(spec.name, spec.mode, uri.rsplit("/", 1)[-1], uri, None, **ids))
    return files


def _run_unit(
    plan: Plan, unit: Unit, ws: Workspace, mounted: Mount | None, cancel: threading.Event
) -> Result:
    if cancel.is_set():
        return Result(Manifest(unit.required, Status.SKIPPED, "not run: the run was stopped"), False)
    try:
        inputs = _input_files(plan, unit, mounted)
    except OSError as err:
        ws.reset()
        manifest = Manifest(unit.required, Status.FAILED, str(err), workspace=str(ws.root), started=now_iso())
        manifest.finished = manifest.started
        manifest.write(ws.manifest)
        return Result(manifest, False)
    job = Job(unit.required, unit.values, ws, inputs, plan.template, plan.outputs)
    harvester = plan.harvester

    def store(files: dict[str, Path]) -> dict[str, str]:
        assert harvester is not None
        return harvester.store(unit.data_id, files)

    manifest = run_job(job, plan.job_options, store if harvester else None, cancel)  # type: ignore[arg-type]
    return Result(manifest, manifest.status is Status.OK)


def _missing_inputs(unit: Unit, ws: Workspace) -> Result:
    ws.reset()
    manifest = Manifest(
        unit.required, Status.FAILED, "input not found: " + "; ".join(unit.missing), workspace=str(ws.root)
    )
    manifest.started = manifest.finished = now_iso()
    manifest.write(ws.manifest)
    return Result(manifest, False)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat ``SIGTERM`` like Ctrl-C while running (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _sigint_guard(stack: contextlib.ExitStack) -> Callable[[], None]:
    """Return a function that ignores Ctrl-C until ``stack`` has unwound (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    stack.callback(
        signal.signal, signal.SIGINT, previous if previous is not None else signal.default_int_handler
    )

    def ignore() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return ignore


def execute_plan(plan: Plan, on_result: Callable[[Result], None] | None = None) -> RunSummary:
    """Run the executions of a plan.

    Parameters
    ----------
    plan : `Plan`
        From `plan_run`.
    on_result : callable, optional
        Called in the calling thread with each data ID's `Result` as it finishes (for a
        progress bar); skipped data IDs first.

    Returns
    -------
    summary : `RunSummary`
        Results in data ID order; ``interrupted`` after Ctrl-C.
    """
    try:
        return _execute_plan(plan, on_result)
    finally:
        plan.release()


def _execute_plan(plan: Plan, on_result: Callable[[Result], None] | None) -> RunSummary:
    start = time.monotonic()
    results: dict[DataIdKey, Result] = {}
    report = on_result or (lambda result: None)
    todo: list[tuple[Unit, Workspace]] = []
    for unit in plan.units:
        ws = Workspace(workspace_dir(plan.workdir, unit.required.items()))
        skipped = _skip(plan, unit, ws)
        if skipped is None and unit.missing:
            skipped = _missing_inputs(unit, ws)
        if skipped is not None:
            results[unit.key] = skipped
            report(skipped)
        else:
            todo.append((unit, ws))
    interrupted = False
    if plan.options.fail_fast and any(r.manifest.status is Status.FAILED for r in results.values()):
        for unit, ws in todo:  # an input was missing: --fail-fast starts nothing
            reason = "not run: --fail-fast (a data ID failed)"
            results[unit.key] = Result(
                Manifest(unit.required, Status.SKIPPED, reason, workspace=str(ws.root)), False
            )
            report(results[unit.key])
        todo = []
    if todo:
        interrupted = _execute(plan, todo, results, report)
    summary = RunSummary(
        workdir=plan.workdir,
        results=[results[unit.key] for unit in plan.units],
        overlay=plan.job_options.overlay,
        sandbox=plan.job_options.sandbox,
        interrupted=interrupted,
        elapsed=time.monotonic() - start,
    )
    return summary


def _execute(
    plan: Plan,
    todo: list[tuple[Unit, Workspace]],
    results: dict[DataIdKey, Result],
    report: Callable[[Result], None],
) -> bool:
    """Run ``todo`` in a pool inside the mount; return whether Ctrl-C interrupted it."""
    cancel = threading.Event()  # Ctrl-C: stop running programs too
    stop = threading.Event()  # --fail-fast: start nothing new
    mounted_types = sorted(
        {s.dataset_type for s in plan.inputs if s.mode in (StagingMode.MOUNT, StagingMode.COPY)}
    )
    interrupted = False
    with contextlib.ExitStack() as stack:
        ignore_sigint = _sigint_guard(stack)
        stack.enter_context(_sigterm_as_interrupt())
        mounted: Mount | None = None
        if mounted_types:
            point = plan.workdir / MOUNT_DIR
            point.mkdir(exist_ok=True)
            mounted = stack.enter_context(
                mount(
                    plan.options.repo,
                    str(point),
                    list(plan.options.collections),
                    mounted_types,
                    watch_pid=os.getpid(),
                    cleanup_under=str(plan.workdir),
                )
            )
        pool = stack.enter_context(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=plan.options.jobs, thread_name_prefix="butlerfs-run"
            )
        )

        def task(unit: Unit, ws: Workspace) -> Result:
            if stop.is_set():
                reason = "not run: the run was stopped" if cancel.is_set() else "not run: --fail-fast"
                return Result(Manifest(unit.required, Status.SKIPPED, reason, workspace=str(ws.root)), False)
            try:
                return _run_unit(plan, unit, ws, mounted, cancel)
            except OSError as err:
                if err.errno not in _NO_SPACE:
                    return internal_error(unit, err)
                manifest = Manifest(
                    unit.required,
                    Status.FAILED,
                    out_of_space_message(err.filename or ws.root),
                    workspace=str(ws.root),
                )
                manifest.started = manifest.finished = now_iso()
                _LOG.error("Data ID %s: %s", unit.required, manifest.reason)
                with contextlib.suppress(OSError):  # the disk is full: the manifest may not fit
                    manifest.write(ws.manifest)
                return Result(manifest, False)
            except Exception as err:
                return internal_error(unit, err)

        def internal_error(unit: Unit, err: Exception) -> Result:
            # A bug must not take the other data IDs down.
            _LOG.error("Data ID %s: internal error", unit.required, exc_info=err)
            return Result(Manifest(unit.required, Status.FAILED, f"internal error: {err!r}"), False)

        futures = {pool.submit(task, unit, ws): unit for unit, ws in todo}
        pending = set(futures)
        while pending:
            try:
                finished, pending = concurrent.futures.wait(
                    pending, timeout=0.2, return_when=concurrent.futures.FIRST_COMPLETED
                )
                for future in finished:
                    result = future.result()
                    results[futures[future].key] = result
                    report(result)
                    if plan.options.fail_fast and result.manifest.status in (Status.FAILED, Status.TIMEOUT):
                        stop.set()
            except KeyboardInterrupt:
                if not interrupted:
                    _LOG.warning("Interrupted: stopping the running programs; nothing half-done is stored")
                interrupted = True
                cancel.set()
                stop.set()
                for future in list(pending):
                    if future.done():  # finished while we were interrupted: keep its result
                        pending.discard(future)
                        results[futures[future].key] = future.result()
        ignore_sigint()  # unmounting must not be cut short by a second Ctrl-C
    if mounted_types:
        with contextlib.suppress(OSError):
            (plan.workdir / MOUNT_DIR).rmdir()
    return interrupted


def run(options: RunOptions, on_result: Callable[[Result], None] | None = None) -> RunSummary:
    """Plan and execute a run.

    Parameters
    ----------
    options : `RunOptions`
        The run.
    on_result : callable, optional
        See `execute_plan`.

    Returns
    -------
    summary : `RunSummary`
        What happened.

    Raises
    ------
    UsageError
        For bad input, before anything runs.
    """
    return execute_plan(plan_run(options), on_result)
