"""Declared outputs: ``NAME=GLOB[:DATASET_TYPE]``, matched against what a program wrote.

After the program exits, each glob is matched against the files it created or changed (the
overlay's upper layer); exactly one file must match. Storing the matched files is the
caller's business (`wrapper.harvest` for a Butler, ``butlerQC.put`` for a PipelineTask).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from butlerfs.errors import UsageError

from .workspace import glob_match

__all__ = ["MissingOutputError", "OutputSpec", "match_outputs"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class MissingOutputError(Exception):
    """A declared output matched no file, or more than one."""


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """A declared output: ``NAME=GLOB[:DATASET_TYPE]``.

    Attributes
    ----------
    name : `str`
        The output's name.
    glob : `str`
        Pattern relative to the working directory (``cat.fits``, ``*.cat``, ``**/*.fits``).
    dataset_type : `str`
        Dataset type to store it as; defaults to ``name``.
    """

    name: str
    glob: str
    dataset_type: str

    @classmethod
    def parse(cls, text: str) -> OutputSpec:
        """Parse ``NAME=GLOB[:DATASET_TYPE]``.

        Raises
        ------
        UsageError
            Raised for anything else.
        """
        name, sep, rest = text.partition("=")
        glob, _, dataset_type = rest.rpartition(":") if ":" in rest else (rest, "", "")
        name, glob, dataset_type = name.strip(), glob.strip(), dataset_type.strip() or name.strip()
        if not sep or not _NAME.fullmatch(name) or not glob or not _valid_type_name(dataset_type):
            raise UsageError(
                f"malformed --output {text!r}: expected NAME=GLOB[:DATASET_TYPE], e.g. cat=cat.fits:srcCat"
            )
        if glob.startswith("/") or ".." in glob.split("/"):
            raise UsageError(f"--output {text!r}: the glob is relative to the working directory")
        return cls(name, glob, dataset_type)


def _valid_type_name(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) is not None


def match_outputs(changed: Sequence[str], specs: Iterable[OutputSpec]) -> dict[str, str]:
    """Match each declared output against the files the program created or changed.

    Parameters
    ----------
    changed : `~collections.abc.Sequence` [`str`]
        Relative paths, as `Workspace.changed_files` returns them.
    specs : `~collections.abc.Iterable` [`OutputSpec`]
        The declared outputs.

    Returns
    -------
    matches : `dict` [`str`, `str`]
        The one relative path per output name.

    Raises
    ------
    MissingOutputError
        Raised naming every output that matched no file or several.
    """
    matches: dict[str, str] = {}
    problems = []
    for spec in specs:
        found = [path for path in changed if glob_match(spec.glob, path)]
        if len(found) == 1:
            matches[spec.name] = found[0]
        elif not found:
            problems.append(f"output {spec.name}: no file matches {spec.glob!r}")
        else:
            problems.append(
                f"output {spec.name}: {len(found)} files match {spec.glob!r} ({', '.join(found)})"
            )
    if problems:
        listing = ", ".join(changed[:10]) + (", ..." if len(changed) > 10 else "") if changed else "nothing"
        raise MissingOutputError(f"{'; '.join(problems)} (the program wrote: {listing})")
    return matches
