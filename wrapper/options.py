"""What ``butlerfs run`` is told: the one definition of its options and their defaults.

The command line (`butlerfs.cli`), the Python API (`butlerfs.run`) and `wrapper.run` all read
`RunOptions`. This module imports nothing heavy (no Butler), so the command line can take its
defaults from here without importing the stack.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .outputs import OutputSpec
from .sandbox import SandboxMode
from .workspace import OverlayMode

if TYPE_CHECKING:
    from .inputs import InputSpec

__all__ = ["RunOptions", "TransferMode", "run_defaults"]


class TransferMode(enum.StrEnum):
    """Ingest transfer modes offered for outputs."""

    MOVE = "move"
    COPY = "copy"
    LINK = "link"
    SYMLINK = "symlink"


@dataclasses.dataclass
class RunOptions:
    """Everything ``butlerfs run`` is told; see ``docs/RUN.md``.

    Each field is a command-line option of ``butlerfs run`` (``network`` is
    ``--no-network`` inverted, ``command`` what follows ``--``) and a keyword argument of
    `butlerfs.run`, with the same default.

    Attributes
    ----------
    repo : `str`
        Repository path, URI or label.
    collections : `~collections.abc.Sequence` [`str`]
        Collections to search, in order (``--collections``).
    inputs : `~collections.abc.Sequence` [`str` or `~wrapper.inputs.InputSpec`]
        ``NAME=DATASET_TYPE[:MODE]``; the first input gives the data IDs (``--input``).
    command : `~collections.abc.Sequence` [`str`]
        The program and its arguments, with placeholders.
    where : `str`
        Butler query expression constraining the first input (``--where``).
    outputs : `~collections.abc.Sequence` [`str` or `~wrapper.outputs.OutputSpec`]
        ``NAME=GLOB[:DATASET_TYPE]`` (``--output``).
    output_run : `str` or `None`
        RUN collection receiving the outputs (``--output-run``).
    jobs : `int`
        Data IDs at once (``-j``).
    timeout : `float` or `None`
        Seconds before a program is stopped (``--timeout``).
    sandbox : `~wrapper.sandbox.SandboxMode` or `str`
        ``auto``, ``on`` or ``off`` (``--sandbox``).
    network : `bool`
        Whether the program has network access (``--no-network`` sets it false).
    overlay : `~wrapper.workspace.OverlayMode` or `str`
        ``auto``, ``kernel``, ``fuse`` or ``links`` (``--overlay``).
    transfer : `TransferMode` or `str`
        How ingest stores outputs (``--transfer``).
    put : `bool`
        Store outputs with ``butler.put`` instead (``--put``).
    shell : `bool`
        Run the command with ``/bin/sh -c``; values become positional parameters (``--shell``).
    fail_fast : `bool`
        Start no new data ID after one failed (``--fail-fast``).
    rerun_failed : `bool`
        Run again the data IDs that failed before (``--rerun-failed``).
    workdir : `str` or `None`
        Workspaces (``--workdir``; default ``./butlerfs-run/<output run or timestamp>``).
    kill_grace : `float`
        Seconds between ``SIGTERM`` and ``SIGKILL`` when stopping a program (``--kill-grace``).
    """

    repo: str
    collections: Sequence[str]
    inputs: Sequence[str | InputSpec]
    command: Sequence[str]
    where: str = ""
    outputs: Sequence[str | OutputSpec] = ()
    output_run: str | None = None
    jobs: int = 1
    timeout: float | None = None
    sandbox: SandboxMode | str = SandboxMode.AUTO
    network: bool = True
    overlay: OverlayMode | str = OverlayMode.AUTO
    transfer: TransferMode | str = TransferMode.MOVE
    put: bool = False
    shell: bool = False
    fail_fast: bool = False
    rerun_failed: bool = False
    workdir: str | None = None
    kill_grace: float = 5.0


def run_defaults() -> dict[str, Any]:
    """Return the default of every `RunOptions` field that has one, by field name."""
    return {
        field.name: field.default
        for field in dataclasses.fields(RunOptions)
        if field.default is not dataclasses.MISSING
    }
