"""``butlerfs.run``: ``butlerfs run`` from Python, returning the summary as objects.

The keyword arguments are the fields of `wrapper.options.RunOptions`, the one definition the
command line takes its options and defaults from; the signature shown by ``help()`` and
Jupyter is built from it. The Butler is imported on the first call, not on ``import butlerfs``.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import shlex
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from wrapper.options import RunOptions

from .errors import UsageError

if TYPE_CHECKING:
    from wrapper.run import Result, RunSummary

__all__ = ["run"]


def _strings(value: str | Sequence[Any]) -> list[Any]:
    """One string is a one-element list, as one ``--input`` or ``--output`` would be."""
    return [value] if isinstance(value, str) else list(value)


def run(
    repo: str,
    command: str | Sequence[str],
    *,
    on_result: Callable[[Result], None] | None = None,
    **options: Any,
) -> RunSummary:
    """Run a program once per data ID and store its outputs in the Butler, as ``butlerfs run``.

    Parameters
    ----------
    repo : `str`
        Repository path, URI or label.
    command : `str` or `~collections.abc.Sequence` [`str`]
        The program and its arguments with placeholders (``{calexp}``, ``{dataId.visit}``,
        ``{workdir}``), what follows ``--`` on the command line. A string is split as a
        shell would (quotes group, nothing is expanded), or with ``shell=True`` is the
        ``/bin/sh -c`` script itself.
    on_result : callable, optional
        Called with each data ID's `~wrapper.run.Result` as it finishes.
    **options
        The command line's options by their field names in `~wrapper.options.RunOptions`,
        with the same defaults: ``collections`` and ``inputs`` (required), ``where``,
        ``outputs``, ``output_run``, ``jobs``, ``timeout``, ``sandbox``, ``network``,
        ``overlay``, ``transfer``, ``put``, ``shell``, ``fail_fast``, ``rerun_failed``,
        ``workdir``, ``kill_grace``. ``collections``, ``inputs`` and ``outputs`` take a
        list or one string (``collections`` also comma-separated, as ``-c`` does).

    Returns
    -------
    summary : `~wrapper.run.RunSummary`
        Iterate over it for each data ID's `~wrapper.run.Result` (``data_id``, ``status``,
        ``outputs``, ``reason``, ``exit_code``, ``workspace``); ``summary.ok`` is true when
        every data ID is done; ``print(summary)`` shows the command line's table.

    Raises
    ------
    UsageError
        For bad input (an unknown option, a missing collection or dataset type, a
        placeholder without a value, ...), before anything runs.
    """
    import wrapper.run  # the Butler: seconds, so only now

    unknown = sorted(set(options) - _FIELDS)
    if unknown:
        raise UsageError(f"butlerfs.run() got unknown option(s) {', '.join(unknown)}: see help(butlerfs.run)")
    missing = [name for name in ("collections", "inputs") if name not in options]
    if missing:
        raise UsageError(f"butlerfs.run() needs {' and '.join(missing)}")
    if isinstance(options["collections"], str):
        options["collections"] = [c.strip() for c in options["collections"].split(",") if c.strip()]
    options["inputs"] = _strings(options["inputs"])
    if "outputs" in options:
        options["outputs"] = _strings(options["outputs"])
    if isinstance(command, str):
        command = [command] if options.get("shell") else shlex.split(command)
    return wrapper.run.run(RunOptions(repo=repo, command=list(command), **options), on_result)


_FIELDS = {field.name for field in dataclasses.fields(RunOptions)} - {"repo", "command"}


def _plain(value: Any) -> Any:
    """A mode's string (``'auto'``), which is what a caller would write; no default stays none."""
    if value is dataclasses.MISSING:
        return inspect.Parameter.empty
    return str(value) if isinstance(value, enum.Enum) else value


def _signature() -> inspect.Signature:
    """``run``'s signature as ``help()`` should show it: every option with its default."""
    own = inspect.signature(run).parameters
    keyword = [
        inspect.Parameter(
            field.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=_plain(field.default),
            annotation=field.type,
        )
        for field in dataclasses.fields(RunOptions)
        if field.name in _FIELDS
    ]
    return inspect.signature(run).replace(
        parameters=[own["repo"], own["command"], *keyword, own["on_result"]]
    )


run.__signature__ = _signature()  # type: ignore[attr-defined]
