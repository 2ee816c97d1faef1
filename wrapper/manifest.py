"""The per-data-ID manifest: what ran, on what, how it went, and what was kept.

``manifest.json`` in each workspace is written atomically (temporary file + rename) when the
data ID finishes, whatever the outcome. A rerun reads it to skip finished console-only data
IDs and, unless asked to rerun them, failed ones.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_VERSION", "InputRecord", "Manifest", "OutputRecord", "Status"]

_LOG = logging.getLogger(__name__)

MANIFEST_VERSION = 1


class Status(enum.StrEnum):
    """Outcome of one data ID."""

    OK = "ok"
    FAILED = "failed"
    """Non-zero exit, killed by a signal, a declared output missing, or storing outputs failed."""
    TIMEOUT = "timeout"
    SKIPPED = "skipped"
    """Not run: done in a previous run (or failed there, without ``--rerun-failed``)."""
    INTERRUPTED = "interrupted"
    """Stopped by Ctrl-C; a rerun runs it again."""


@dataclasses.dataclass
class InputRecord:
    """One input as the program saw it."""

    name: str
    dataset_type: str | None
    dataset_id: str | None
    uri: str
    staging: str
    given: str
    """The path (or URI) substituted for the placeholder."""
    note: str = ""


@dataclasses.dataclass
class OutputRecord:
    """One declared output stored in the Butler."""

    name: str
    dataset_type: str
    dataset_id: str
    file: str
    """Path of the file relative to the working directory."""


def now_iso() -> str:
    """Return the current time as an ISO 8601 string in UTC."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


@dataclasses.dataclass
class Manifest:
    """Everything recorded about one data ID.

    Attributes
    ----------
    data_id : `dict` [`str`, `int` or `str`]
        The execution's data ID (required dimensions).
    status : `Status`
        Outcome.
    reason : `str`
        Why it is not ``ok`` (empty when it is).
    argv : `list` [`str`]
        The exact argument vector executed (inside the sandbox command, if any).
    sandbox_argv : `list` [`str`]
        The bubblewrap prefix, empty without a sandbox.
    exit_code, signal : `int` or `None`
        Exit status, or the signal that killed the program.
    wall_time, cpu_user, cpu_system : `float` or `None`
        Seconds; CPU time covers the process tree.
    peak_rss : `int` or `None`
        Peak resident memory of the whole process tree, in bytes.
    overlay : `str` or `None`
        Overlay mode used (``kernel``, ``fuse``, ``links``).
    sandbox : `bool` or `None`
        Whether bubblewrap was used.
    network : `bool` or `None`
        Whether the program had network access.
    inputs, outputs : `list`
        `InputRecord` and `OutputRecord` entries.
    undeclared : `list` [`str`]
        Files the program created or changed that no output claimed; they stay in the
        workspace (``upper/``, or ``merged/`` in links mode).
    killed : `list` [`dict`]
        Processes the program left running when it exited, stopped then
        (``{"pid": ..., "command": ...}``).
    workspace : `str`
        The workspace directory.
    started, finished : `str`
        ISO 8601 timestamps.
    """

    data_id: dict[str, Any]
    status: Status
    reason: str = ""
    argv: list[str] = dataclasses.field(default_factory=list)
    sandbox_argv: list[str] = dataclasses.field(default_factory=list)
    exit_code: int | None = None
    signal: int | None = None
    wall_time: float | None = None
    cpu_user: float | None = None
    cpu_system: float | None = None
    peak_rss: int | None = None
    overlay: str | None = None
    sandbox: bool | None = None
    network: bool | None = None
    inputs: list[InputRecord] = dataclasses.field(default_factory=list)
    outputs: list[OutputRecord] = dataclasses.field(default_factory=list)
    undeclared: list[str] = dataclasses.field(default_factory=list)
    killed: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    workspace: str = ""
    started: str = ""
    finished: str = ""
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        out = dataclasses.asdict(self)
        out["status"] = str(self.status)
        return out

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write atomically to ``path``."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest | None:
        """Read a manifest; `None` if missing or unreadable."""
        try:
            data = json.loads(Path(path).read_text())
            data["status"] = Status(data["status"])
            data["inputs"] = [InputRecord(**i) for i in data.get("inputs", [])]
            data["outputs"] = [OutputRecord(**o) for o in data.get("outputs", [])]
            return cls(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as err:
            _LOG.warning("Ignoring unreadable manifest %s: %s", path, err)
            return None
