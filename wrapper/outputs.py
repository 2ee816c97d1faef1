"""Declared outputs: ``NAME=GLOB[:DATASET_TYPE]``, matched against what a program wrote.

After the program exits, each glob is matched against the files it created or changed (the
overlay's upper layer); exactly one file must match. `claim_outputs` then checks that each
matched file is a regular file the program wrote inside the workspace (not a symbolic link, a
hard link to a file elsewhere, a device, a FIFO or a directory), through descriptors opened
without following links, and moves it into a directory only the runner uses, so what is stored
is what was checked. Storing the claimed files is the caller's business (`wrapper.harvest` for
a Butler, ``butlerQC.put`` for a PipelineTask).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from butlerfs.errors import UsageError

from .workspace import glob_match

__all__ = [
    "MissingOutputError",
    "OutputSpec",
    "UnsafeOutputError",
    "claim_outputs",
    "match_outputs",
    "release_outputs",
]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class MissingOutputError(Exception):
    """A declared output matched no file, or more than one."""


class UnsafeOutputError(MissingOutputError):
    """A declared output that is not a regular file written inside the workspace."""


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


_KINDS = (
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


@contextlib.contextmanager
def _open_parent(root: Path, rel: str) -> Iterator[int]:
    """Open the directory holding ``rel`` one component at a time, never following a link."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in rel.split("/")[:-1]:
            try:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as err:
                raise UnsafeOutputError(
                    f"{part!r} on its path is not a directory of the workspace ({err.strerror})"
                ) from None
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _links_inside(root: Path) -> dict[tuple[int, int], int]:
    """Count the names each regular file has under ``root`` (hard links the program made)."""
    counts: dict[tuple[int, int], int] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                if stat.S_ISREG(st.st_mode):
                    counts[st.st_dev, st.st_ino] = counts.get((st.st_dev, st.st_ino), 0) + 1
    return counts


def claim_outputs(root: Path, matched: Mapping[str, str], into: Path) -> dict[str, Path]:
    """Check the matched outputs and move them out of the program's reach, all or none.

    Parameters
    ----------
    root : `pathlib.Path`
        The directory the matched paths are relative to (the upper layer).
    matched : `~collections.abc.Mapping` [`str`, `str`]
        The relative path of each output by name, from `match_outputs`.
    into : `pathlib.Path`
        An empty directory of the runner on the same filesystem; each file is moved to
        ``into/NAME/FILE``.

    Returns
    -------
    files : `dict` [`str`, `pathlib.Path`]
        Where each output is now.

    Raises
    ------
    UnsafeOutputError
        Raised for the first output that is not a regular file with one name inside the
        workspace; nothing is moved then.
    """
    root_dev = os.lstat(root).st_dev
    counts: dict[tuple[int, int], int] | None = None
    checked: list[tuple[str, str, tuple[int, int]]] = []
    for name, rel in sorted(matched.items()):
        what = f"output {name} ({rel})"
        try:
            with _open_parent(root, rel) as parent:
                base = rel.rsplit("/", 1)[-1]
                st = os.stat(base, dir_fd=parent, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    link = os.readlink(base, dir_fd=parent)
                    raise UnsafeOutputError(f"is a symbolic link to {link}")
                if not stat.S_ISREG(st.st_mode):
                    raise UnsafeOutputError(f"is {_kind(st.st_mode)}")
                # Opened without following links, so the file checked is the file kept.
                fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=parent)
                try:
                    fst = os.fstat(fd)
                finally:
                    os.close(fd)
                if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
                    raise UnsafeOutputError("was replaced while it was checked")
                if fst.st_dev != root_dev:
                    raise UnsafeOutputError("is on another filesystem than the workspace")
                if fst.st_nlink > 1:
                    counts = _links_inside(root) if counts is None else counts
                    inside = counts.get((fst.st_dev, fst.st_ino), 0)
                    if fst.st_nlink > inside:
                        raise UnsafeOutputError(
                            f"is a hard link to a file outside the workspace ({fst.st_nlink} names, "
                            f"{inside} of them in the workspace)"
                        )
        except UnsafeOutputError as err:
            raise UnsafeOutputError(
                f"{what} {err}: only regular files the program wrote are stored; nothing of this data ID "
                "was stored"
            ) from None
        except OSError as err:
            raise UnsafeOutputError(f"{what} cannot be read: {err.strerror}; nothing was stored") from None
        checked.append((name, rel, (fst.st_dev, fst.st_ino)))
    files: dict[str, Path] = {}
    moved: list[tuple[Path, Path]] = []
    try:
        for name, rel, identity in checked:
            target = into / name / rel.rsplit("/", 1)[-1]
            target.parent.mkdir(parents=True, exist_ok=True)
            with _open_parent(root, rel) as parent:
                os.rename(rel.rsplit("/", 1)[-1], target, src_dir_fd=parent)
            moved.append((root / rel, target))
            st = os.lstat(target)
            if (st.st_dev, st.st_ino) != identity:
                raise UnsafeOutputError(
                    f"output {name} ({rel}) was replaced while it was checked; nothing was stored"
                )
            files[name] = target
    except BaseException:
        release_outputs(moved)
        raise
    return files


def release_outputs(moved: Iterable[tuple[Path, Path]]) -> None:
    """Move claimed files back where the program wrote them (storing them failed)."""
    for original, claimed in moved:
        with contextlib.suppress(OSError):
            os.rename(claimed, original)
