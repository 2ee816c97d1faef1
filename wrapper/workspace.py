"""One workspace per data ID: input staging and the writable overlay the program works in.

A workspace directory holds::

    lower/      one read-only layer per overlay-staged input (a link to a leaf directory of
                a butlerfs mount, or a directory holding a copy)
    upper/      the overlay's upper layer: exactly what the program created or changed
    work/       the overlay's work directory
    merged/     the overlay: all input files side by side, writable; the program's cwd
    outputs/    the declared outputs, moved here from upper/ once checked, before storing
    stdout.txt, stderr.txt, manifest.json

Each lower layer holds one file with a unique name (butlerfs names are unique per dataset
type), so stacking them gives one directory with every input. Overlay modes, in the order
``auto`` tries them:

- ``kernel``: kernel overlayfs (it accepts a FUSE mount as a lower layer), mounted by the
  program's reaper in a mount namespace of the program's own (`wrapper.execute.execute`,
  ``overlay=``): as root a plain mount namespace, as a user a user namespace mapping the user
  to itself, with ``-o userxattr``. Only the program sees ``merged/`` as the overlay; the
  kernel unmounts it when the program's last process exits, so nothing is left to unmount,
  whatever dies. The options name the layers relative to the workspace
  (``lowerdir=lower/0:lower/1,upperdir=upper,workdir=work``), so no path needs escaping
  whatever characters it holds.
- ``fuse``: ``fuse-overlayfs``, mounted on ``merged/`` here, unmounted after the program.
- ``links``: no overlay: ``merged/`` holds symbolic links to the inputs, and copies; changes
  are found by comparing ``lstat`` signatures; writing into an input through its link to the
  mount fails with ``EROFS``, while replacing it with a new file works.

What the program created or changed is ``upper/`` (``merged/`` for links), read from outside:
whiteouts of deleted inputs (a ``0/0`` character device, a zero-size file with an
``overlay.whiteout`` attribute, or fuse-overlayfs's ``.wh.`` names) are not listed, and opaque
directories (``overlay.opaque``, made when a directory replaces a deleted input) are walked like
any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from butlerfs.layout import DataIdValue, dimension_dir

from .execute import OverlayError, execute, read_tail

__all__ = [
    "InputFile",
    "OverlayError",
    "OverlayMode",
    "StagedInput",
    "Staging",
    "StagingMode",
    "Workspace",
    "free_space",
    "glob_match",
    "out_of_space_message",
    "probe_overlay",
    "workspace_dir",
]

_LOG = logging.getLogger(__name__)


class StagingMode(enum.StrEnum):
    """How an input reaches the program."""

    MOUNT = "mount"
    """A file of a butlerfs mount, seen through the overlay (default)."""
    DIRECT = "direct"
    """The artifact's path at rest (POSIX datastores)."""
    COPY = "copy"
    """A copy in the workspace, seen through the overlay."""
    URI = "uri"
    """The artifact's URI as a string (``s3://...``), for programs that read URIs."""


class OverlayMode(enum.StrEnum):
    """How the writable working directory is made."""

    AUTO = "auto"
    KERNEL = "kernel"
    FUSE = "fuse"
    LINKS = "links"


_ORDER = (OverlayMode.KERNEL, OverlayMode.FUSE, OverlayMode.LINKS)


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input of one execution, however it was found.

    Attributes
    ----------
    name : `str`
        The placeholder name (``{calexp}``).
    mode : `StagingMode`
        How to stage it.
    file_name : `str`
        Its name inside the working directory (``calexp_LSSTCam-imSim_0_733724.fits``).
    uri : `str`
        The artifact's URI.
    path : `str` or `None`
        A local path where the file can be read: in a butlerfs mount for ``mount``, the
        artifact at rest for ``direct``; for ``copy``, either (`None`: fetched from ``uri``).
    dataset_id : `str` or `None`
        The dataset's UUID, for the manifest.
    dataset_type : `str` or `None`
        The dataset type name, for the manifest.
    """

    name: str
    mode: StagingMode
    file_name: str
    uri: str
    path: str | None = None
    dataset_id: str | None = None
    dataset_type: str | None = None


@dataclasses.dataclass(frozen=True)
class StagedInput:
    """How an input was actually staged (a ``mount`` input may fall back to ``copy``)."""

    name: str
    mode: StagingMode
    given: str
    """The string substituted for ``{name}``."""
    uri: str
    dataset_id: str | None
    dataset_type: str | None
    note: str = ""


@dataclasses.dataclass
class Staging:
    """A workspace ready for the program, as `Workspace.staged` yields it."""

    overlay: OverlayMode
    inputs: list[StagedInput]
    placed: dict[str, tuple[int, int, int, int]] = dataclasses.field(default_factory=dict)
    """``links`` mode: ``lstat`` signature of each entry staged into ``merged/``."""
    kernel_options: str | None = None
    """``kernel`` mode: the overlay's options, for `~wrapper.execute.execute` to mount it in the
    program's own namespace (layers relative to the workspace)."""

    @property
    def values(self) -> dict[str, str]:
        """The placeholder value of each input by name."""
        return {i.name: i.given for i in self.inputs}


def out_of_space_message(path: str | os.PathLike[str]) -> str:
    """Return ``the workspace ran out of space (<path>, <free> free)`` for an ENOSPC/EDQUOT.

    Parameters
    ----------
    path : path-like
        A path on the full filesystem (need not exist: its nearest existing parent is used).

    Returns
    -------
    message : `str`
        The reason, with the space left for this user (``?`` when it cannot be read).
    """
    return f"the workspace ran out of space ({path}, {free_space(path)} free)"


def free_space(path: str | os.PathLike[str]) -> str:
    """Return the space left for this user on the filesystem of ``path`` (``1.2 MiB``; ``?``)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return "?"
    return _human(st.f_bavail * st.f_frsize)


def _human(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def workspace_dir(root: str | os.PathLike[str], data_id: Iterable[tuple[str, DataIdValue]]) -> Path:
    """Return the workspace of a data ID: ``root/instrument_X/detector_0/visit_1/``.

    Parameters
    ----------
    root : path-like
        The run's work directory.
    data_id : `~collections.abc.Iterable` [`tuple` [`str`, `int` or `str`]]
        Required dimensions and values in universe order.

    Returns
    -------
    path : `pathlib.Path`
        One directory level per dimension, named as butlerfs names them.
    """
    return Path(root, *(dimension_dir(k, v) for k, v in data_id))


def glob_match(pattern: str, path: str) -> bool:
    """Match a relative path against a glob (``*``, ``?``, ``[...]``, ``**`` across directories).

    Parameters
    ----------
    pattern : `str`
        Glob relative to the working directory (``cat.fits``, ``*.fits``, ``**/*.cat``).
    path : `str`
        Relative path with ``/`` separators.

    Returns
    -------
    matched : `bool`
        Whether the whole path matches.
    """
    return re.fullmatch(_translate(pattern), path) is not None


def _translate(pattern: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2 :]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1 : end]
            body = "^" + body[1:] if body.startswith("!") else body
            out.append(f"[{body.replace('\\', '\\\\')}]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


_WHITEOUT_XATTRS = ("user.overlay.whiteout", "trusted.overlay.whiteout")


def _is_whiteout(path: Path, st: os.stat_result, mode: OverlayMode) -> bool:
    """Whether an entry of an upper layer is a whiteout (an input deleted), not a file."""
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
        return True  # overlayfs's own, as root and (userxattr) in a user namespace alike
    if mode is OverlayMode.FUSE and path.name.startswith(".wh."):
        return True  # fuse-overlayfs without the right to make devices
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:  # an "xwhiteout" (Linux >= 6.7)
        for name in _WHITEOUT_XATTRS:
            with contextlib.suppress(OSError):
                os.getxattr(path, name, follow_symlinks=False)
                return True
    return False


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


def _run(argv: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=cwd, capture_output=True, text=True)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if "unknown argument ignored" not in line]
    return lines[-1] if lines else "unknown error"


class Workspace:
    """The workspace directory of one data ID.

    Parameters
    ----------
    root : path-like
        Its directory (created when needed).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).absolute()
        self.lower = self.root / "lower"
        self.upper = self.root / "upper"
        self.work = self.root / "work"
        self.merged = self.root / "merged"
        self.claimed = self.root / "outputs"
        self.stdout = self.root / "stdout.txt"
        self.stderr = self.root / "stderr.txt"
        self.manifest = self.root / "manifest.json"

    def reset(self) -> None:
        """Empty the workspace of a previous attempt (unmounting a stale overlay) and recreate it."""
        if os.path.ismount(self.merged):
            _LOG.warning("Unmounting a stale overlay at %s", self.merged)
            self._unmount(None)
        for path in (self.lower, self.upper, self.work, self.merged, self.claimed):
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path, onexc=_force_remove)
        for path in (self.stdout, self.stderr, self.manifest):
            path.unlink(missing_ok=True)
        for path in (self.lower, self.upper, self.work, self.merged):
            path.mkdir(parents=True)

    def remove(self) -> None:
        """Delete the workspace directory and everything in it (no overlay may be mounted)."""
        if os.path.ismount(self.merged):
            raise OverlayError(f"cannot remove {self.root}: {self.merged} is still mounted")
        shutil.rmtree(self.root, onexc=_force_remove)

    @contextlib.contextmanager
    def staged(
        self, inputs: Sequence[InputFile], overlay: OverlayMode | str = OverlayMode.AUTO
    ) -> Iterator[Staging]:
        """Stage ``inputs`` and mount the overlay for the duration of the block.

        Parameters
        ----------
        inputs : `~collections.abc.Sequence` [`InputFile`]
            The inputs of this execution.
        overlay : `OverlayMode` or `str`, optional
            The mode to use; ``auto`` takes the first that works in the order kernel, fuse,
            links (kernel as `probe_overlay` found it for this filesystem, once per process);
            ``fuse`` falls back to links if fuse-overlayfs fails. ``kernel`` is taken as given:
            the program's reaper mounts it, and says why if it cannot.

        Yields
        ------
        staging : `Staging`
            Placeholder values and the mode used. A ``fuse`` overlay is unmounted when the
            block exits, also on an exception; a ``kernel`` one is not mounted here at all
            (``staging.kernel_options``).

        Raises
        ------
        ValueError
            Raised when two inputs would have the same name in the working directory, or a
            ``direct`` input has no local path.
        OverlayError
            Raised when even the links mode cannot be staged.
        """
        self.reset()
        staged, layers, copies = self._stage_inputs(inputs)
        mode = self._mount(layers, OverlayMode(overlay))
        staging = Staging(mode, staged)
        if mode is OverlayMode.KERNEL:
            staging.kernel_options = self._options(layers)
        elif mode is OverlayMode.LINKS:
            self._place_links(staging, layers, copies)
        try:
            yield staging
        finally:
            if mode is OverlayMode.FUSE:
                self._unmount(mode)
            if mode is not OverlayMode.LINKS and not os.path.ismount(self.merged):
                self._empty_work()

    def _empty_work(self) -> None:
        """Empty the overlay's scratch directory once no overlay uses it.

        overlayfs leaves ``work/work`` with mode 000: a kept workspace must stay browsable
        and deletable by its owner with plain ``find`` and ``rm -rf``.
        """
        for child in list(self.work.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, onexc=_force_remove)
            else:
                child.unlink(missing_ok=True)

    def changed_files(self, staging: Staging) -> list[str]:
        """Return what the program created or changed, relative to its working directory.

        Call after the program exited and the block of `staged` did (overlay unmounted).
        Whiteouts (deleted input files) and directories, opaque ones included, are not
        listed; the files in them are.

        Parameters
        ----------
        staging : `Staging`
            The staging the program ran in.

        Returns
        -------
        paths : `list` [`str`]
            Sorted relative paths (``/`` separators) of regular files and links.
        """
        top = self.changed_root(staging)
        out = []
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                path = Path(dirpath, name)
                rel = path.relative_to(top).as_posix()
                st = path.lstat()
                if _is_whiteout(path, st, staging.overlay):
                    continue
                if staging.placed.get(rel) == _signature(st):
                    continue
                out.append(rel)
        return sorted(out)

    def changed_root(self, staging: Staging) -> Path:
        """The directory `changed_files` are relative to: ``upper/`` (``merged/`` for links)."""
        return self.merged if staging.overlay is OverlayMode.LINKS else self.upper

    # -- staging -------------------------------------------------------------------------------

    def _stage_inputs(self, inputs: Sequence[InputFile]) -> tuple[list[StagedInput], list[Path], list[Path]]:
        """Prepare lower layers; return staged inputs, the layer directories and the copies."""
        staged: list[StagedInput] = []
        layers: list[Path] = []
        copies: list[Path] = []
        names: dict[str, str] = {}
        for index, item in enumerate(inputs):
            mode, note = item.mode, ""
            if mode in (StagingMode.MOUNT, StagingMode.COPY):
                if names.setdefault(item.file_name, item.name) != item.name:
                    raise ValueError(
                        f"inputs {names[item.file_name]} and {item.name} are both named {item.file_name}"
                    )
                layer = self.lower / str(index)
                exclusive = mode is StagingMode.MOUNT and item.path is not None and _sole_file(item)
                if exclusive:
                    assert item.path is not None
                    layer.symlink_to(os.path.dirname(item.path), target_is_directory=True)
                else:
                    if mode is StagingMode.MOUNT:
                        mode, note = StagingMode.COPY, "its mount directory holds other files: copied"
                    layer.mkdir()
                    copies.append(_copy_in(item, layer / item.file_name))
                layers.append(layer)
                given = str(self.merged / item.file_name)
            elif mode is StagingMode.DIRECT:
                if item.path is None:
                    raise ValueError(f"input {item.name} ({item.uri}) has no POSIX path for direct staging")
                given = item.path
            else:
                given = item.uri
            staged.append(
                StagedInput(item.name, mode, given, item.uri, item.dataset_id, item.dataset_type, note)
            )
        return staged, layers, copies

    def _place_links(self, staging: Staging, layers: Sequence[Path], copies: Sequence[Path]) -> None:
        """``links`` mode: link (or move the copy of) each layer's file into ``merged/``."""
        copied = set(copies)
        for layer in layers:
            (name,) = os.listdir(layer)
            source = layer / name
            target = self.merged / name
            if source in copied:
                source.rename(target)  # a private copy may be edited in place
            else:
                target.symlink_to(os.path.realpath(source))
            staging.placed[name] = _signature(target.lstat())

    # -- overlay -------------------------------------------------------------------------------

    def _options(self, layers: Sequence[Path]) -> str:
        """The overlay's mount options, every path relative to the workspace."""
        if not layers:
            empty = self.lower / "empty"
            empty.mkdir(exist_ok=True)
            layers = [empty]
        lowerdir = ":".join(os.path.relpath(layer, self.root) for layer in layers)
        return f"lowerdir={lowerdir},upperdir=upper,workdir=work"

    def _mount(
        self, layers: Sequence[Path], wanted: OverlayMode, problems: list[str] | None = None
    ) -> OverlayMode:
        """Decide the mode, mounting fuse-overlayfs here if it is the one; return the mode."""
        problems = [] if problems is None else problems
        candidates = _ORDER if wanted is OverlayMode.AUTO else _ORDER[_ORDER.index(wanted) :]
        for mode in candidates:
            if mode is OverlayMode.KERNEL:
                problem = None if wanted is OverlayMode.KERNEL else _kernel_problem_cached(self.root.parent)
                if problem is None:
                    return mode
                problems.append(f"kernel: {problem}")
            elif mode is OverlayMode.LINKS:
                if problems:
                    _LOG.debug("Overlay fell back to links: %s", "; ".join(problems))
                return mode
            elif shutil.which("fuse-overlayfs") is None:
                problems.append("fuse: fuse-overlayfs not found (Debian: apt-get install fuse-overlayfs)")
            else:
                result = _run(["fuse-overlayfs", "-o", self._options(layers), "merged"], self.root)
                if result.returncode == 0 and os.path.ismount(self.merged):
                    if problems:
                        _LOG.debug("Overlay fell back to %s: %s", mode, "; ".join(problems))
                    return mode
                problems.append(f"fuse: {_last_line(result.stderr)}")
                shutil.rmtree(self.work, onexc=_force_remove)
                self.work.mkdir(exist_ok=True)
        raise OverlayError(f"no overlay could be mounted: {'; '.join(problems)}")

    def _unmount(self, mode: OverlayMode | None) -> None:
        """Unmount ``merged/``, waiting a little if busy, lazily as a last resort."""
        fuse = mode is OverlayMode.FUSE or (mode is None and _fs_type(self.merged).startswith("fuse"))
        argv = ["fusermount3", "-u", "merged"] if fuse else ["umount", "merged"]
        for attempt in range(20):
            result = _run(argv, self.root)
            if result.returncode == 0 or not os.path.ismount(self.merged):
                return
            time.sleep(0.05 * (attempt + 1))
        _LOG.warning(
            "Overlay %s stays busy (%s); detaching it lazily", self.merged, _last_line(result.stderr)
        )
        lazy = ["fusermount3", "-uz", "merged"] if fuse else ["umount", "-l", "merged"]
        result = _run(lazy, self.root)
        if result.returncode != 0 and os.path.ismount(self.merged):
            raise OverlayError(f"cannot unmount {self.merged}: {_last_line(result.stderr)}")


def _sole_file(item: InputFile) -> bool:
    """Whether the input's directory holds only this file, under the expected name."""
    assert item.path is not None
    try:
        return os.listdir(os.path.dirname(item.path)) == [item.file_name] == [os.path.basename(item.path)]
    except OSError:
        return False


def _copy_in(item: InputFile, target: Path) -> Path:
    """Copy an input into the workspace, from its local path or its URI."""
    if item.path is not None:
        shutil.copyfile(item.path, target)
    else:
        from lsst.resources import ResourcePath

        ResourcePath(target).transfer_from(ResourcePath(item.uri), transfer="copy")
    os.chmod(target, 0o644)
    return target


def _fs_type(path: Path) -> str:
    best, kind = "", ""
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1].encode().decode("unicode_escape")
            if str(path) == point or str(path).startswith(point.rstrip("/") + "/"):
                if len(point) >= len(best):
                    best, kind = point, fields[2]
    return kind


def _force_remove(func: object, path: str, exc: BaseException) -> None:
    """``rmtree`` error handler: make a directory writable (overlay work dirs are 000) and retry."""
    parent = os.path.dirname(path)
    with contextlib.suppress(OSError):
        os.chmod(parent, 0o700)
        os.chmod(path, 0o700)
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


_PROBE = """
import os
assert open("probe").read() == "ok\\n", "the lower layer is not visible"
with open("written", "w") as out:
    out.write("ok\\n")
os.remove("probe")
"""
"""The program run in a probe overlay: it must see the lower layer, write, and delete."""

_kernel_problems: dict[int, str | None] = {}


def _kernel_problem(directory: Path) -> str | None:
    """Mount a kernel overlay as a program's would be, in ``directory``; return why it failed."""
    probe = Workspace(directory / ".overlay-probe")
    try:
        probe.reset()
        (probe.lower / "0").mkdir()
        (probe.lower / "0" / "probe").write_text("ok\n")
        staging = Staging(OverlayMode.KERNEL, [], kernel_options=probe._options([probe.lower / "0"]))
        try:
            result = execute(
                [sys.executable, "-I", "-S", "-c", _PROBE],
                cwd=probe.merged,
                stdout=probe.stdout,
                stderr=probe.stderr,
                timeout=60,
                kill_grace=1,
                overlay=staging.kernel_options,
            )
        except OverlayError as err:
            return str(err).removeprefix("kernel overlay: ")
        if not result.ok:
            tail = read_tail(probe.stderr).strip().splitlines()
            return f"a program in the overlay failed: {tail[-1] if tail else result.exit_code}"
        if probe.changed_files(staging) != ["written"] or not (probe.lower / "0" / "probe").exists():
            return f"the overlay did not keep changes in upper/: {probe.changed_files(staging)}"
        return None
    finally:
        shutil.rmtree(probe.root, onexc=_force_remove)


def _kernel_problem_cached(directory: Path) -> str | None:
    """`_kernel_problem` once per filesystem and process."""
    key = os.stat(directory).st_dev
    if key not in _kernel_problems:
        _kernel_problems[key] = _kernel_problem(directory)
    return _kernel_problems[key]


def probe_overlay(
    directory: str | os.PathLike[str], wanted: OverlayMode | str = OverlayMode.AUTO
) -> tuple[OverlayMode, str]:
    """Find the first overlay mode that works in ``directory``, once per run.

    Parameters
    ----------
    directory : path-like
        Where workspaces will live (the upper layer's filesystem matters).
    wanted : `OverlayMode` or `str`, optional
        ``auto``, or the mode to start from.

    Returns
    -------
    mode : `OverlayMode`
        The mode that ran a test program in a test overlay (``links`` always works).
    problems : `str`
        Why the modes tried before it failed, each with its real cause (empty if none failed).
    """
    directory = Path(directory)
    wanted = OverlayMode(wanted)
    problems: list[str] = []
    if wanted in (OverlayMode.AUTO, OverlayMode.KERNEL):
        problem = _kernel_problem(directory)
        _kernel_problems[os.stat(directory).st_dev] = problem
        if problem is None:
            return OverlayMode.KERNEL, ""
        problems.append(f"kernel: {problem}")
        wanted = OverlayMode.FUSE
    probe = Workspace(directory / ".overlay-probe")
    try:
        probe.reset()
        (probe.lower / "0").mkdir()
        (probe.lower / "0" / "probe").write_text("ok\n")
        mode = probe._mount([probe.lower / "0"], wanted, problems)
        if mode is OverlayMode.FUSE:
            probe._unmount(mode)
        return mode, "; ".join(problems)
    finally:
        shutil.rmtree(probe.root, onexc=_force_remove)
