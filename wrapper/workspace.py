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
``auto`` tries them: kernel overlayfs (``mount -t overlay``; it accepts a FUSE mount as a lower
layer), ``fuse-overlayfs``, and a staged directory of links (no overlay: ``merged/`` holds
symbolic links to the inputs, and copies; changes are found by comparing ``lstat``
signatures; writing into an input through its link to the mount fails with ``EROFS``, while
replacing it with a new file works).

Kernel overlays are mounted and unmounted with the ``mount(2)``/``umount2(2)`` system calls,
naming the layers by absolute path (a ``mount`` or ``umount`` process costs some 5 ms each, per
data ID). When a path holds a character overlayfs options would need escaped (comma, colon,
backslash, white space), the options would be too long, or the call fails, the ``mount``
command is run in the workspace instead, with the layers relative to it
(``lowerdir=lower/0:lower/1``), so no path needs escaping whatever characters it holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import functools
import logging
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from butlerfs.layout import DataIdValue, dimension_dir

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


class OverlayError(OSError):
    """An overlay that could not be mounted or unmounted."""


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


def _is_whiteout(path: Path, st: os.stat_result) -> bool:
    return (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0) or path.name.startswith(".wh.")


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode)


_UNSAFE_IN_OPTIONS = re.compile(r"[,:\\\s]")
"""Characters a path in overlayfs mount options would need escaped."""

_MNT_DETACH = 2


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        text = ctypes.c_char_p
        libc.mount.argtypes = [text, text, text, ctypes.c_ulong, text]
        libc.umount2.argtypes = [text, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def _mount_syscall(target: Path, options: str) -> int:
    """``mount("overlay", target, "overlay", 0, options)``; return 0 or the ``errno``."""
    libc = _libc()
    if libc is None or len(options.encode()) >= os.sysconf("SC_PAGE_SIZE"):
        return -1
    if libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode()) == 0:
        return 0
    return ctypes.get_errno() or -1


def _umount_syscall(target: Path, flags: int = 0) -> int:
    """``umount2(target, flags)``; return 0 or the ``errno``."""
    libc = _libc()
    if libc is None:
        return -1
    if libc.umount2(os.fsencode(target), flags) == 0:
        return 0
    return ctypes.get_errno() or -1


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
            The mode to use; ``auto`` (or a mode that fails) tries the next one in the order
            kernel, fuse, links.

        Yields
        ------
        staging : `Staging`
            Placeholder values and the mode used. The overlay is unmounted when the block
            exits, also on an exception.

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
        if mode is OverlayMode.LINKS:
            self._place_links(staging, layers, copies)
        try:
            yield staging
        finally:
            if mode is not OverlayMode.LINKS:
                self._unmount(mode)

    def changed_files(self, staging: Staging) -> list[str]:
        """Return what the program created or changed, relative to its working directory.

        Call after the block of `staged` exited (overlay unmounted). Whiteouts (deleted
        input files) and directories are not listed.

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
                if _is_whiteout(path, st):
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

    def _mount(
        self, layers: Sequence[Path], wanted: OverlayMode, problems: list[str] | None = None
    ) -> OverlayMode:
        if not layers:
            empty = self.lower / "empty"
            empty.mkdir()
            layers = [empty]
        lowerdir = ":".join(os.path.relpath(layer, self.root) for layer in layers)
        options = f"lowerdir={lowerdir},upperdir=upper,workdir=work"
        candidates = _ORDER if wanted is OverlayMode.AUTO else _ORDER[_ORDER.index(wanted) :]
        problems = [] if problems is None else problems
        for mode in candidates:
            if mode is OverlayMode.LINKS:
                if problems:
                    _LOG.debug("Overlay fell back to links: %s", "; ".join(problems))
                return mode
            if mode is OverlayMode.KERNEL and self._mount_kernel(layers):
                if problems:
                    _LOG.debug("Overlay fell back to %s: %s", mode, "; ".join(problems))
                return mode
            argv = (
                ["mount", "-t", "overlay", "overlay", "-o", options, "merged"]
                if mode is OverlayMode.KERNEL
                else ["fuse-overlayfs", "-o", options, "merged"]
            )
            if shutil.which(argv[0]) is None:
                problems.append(f"{argv[0]} not found")
                continue
            result = _run(argv, self.root)
            if result.returncode == 0 and os.path.ismount(self.merged):
                if problems:
                    _LOG.debug("Overlay fell back to %s: %s", mode, "; ".join(problems))
                return mode
            problems.append(f"{mode}: {_last_line(result.stderr)}")
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(exist_ok=True)
        raise OverlayError(f"no overlay could be mounted: {'; '.join(problems)}")

    def _mount_kernel(self, layers: Sequence[Path]) -> bool:
        """Mount a kernel overlay with the system call, layers by absolute path; whether it worked.

        `False` (nothing mounted) when a path would need escaping in the options, they are too
        long, or the call fails: the caller then runs ``mount``, whose message says why.
        """
        paths = [*layers, self.upper, self.work]
        if any(_UNSAFE_IN_OPTIONS.search(str(path)) for path in paths):
            return False
        lowerdir = ":".join(str(layer) for layer in layers)
        options = f"lowerdir={lowerdir},upperdir={self.upper},workdir={self.work}"
        if _mount_syscall(self.merged, options) != 0:
            shutil.rmtree(self.work, ignore_errors=True)
            self.work.mkdir(exist_ok=True)
            return False
        if os.path.ismount(self.merged):
            return True
        _umount_syscall(self.merged, _MNT_DETACH)
        return False

    def _unmount(self, mode: OverlayMode | None) -> None:
        """Unmount ``merged/``, waiting a little if busy, lazily as a last resort."""
        fuse = mode is OverlayMode.FUSE or (mode is None and _fs_type(self.merged).startswith("fuse"))
        if mode is OverlayMode.KERNEL and _umount_syscall(self.merged) == 0:
            return
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
        The mode that mounted a test overlay (``links`` always works).
    problems : `str`
        Why the modes tried before it failed (empty if none failed).
    """
    probe = Workspace(Path(directory) / ".overlay-probe")
    try:
        probe.reset()
        (probe.lower / "0").mkdir()
        (probe.lower / "0" / "probe").write_text("ok\n")
        problems: list[str] = []
        mode = probe._mount([probe.lower / "0"], OverlayMode(wanted), problems)
        if mode is not OverlayMode.LINKS:
            probe._unmount(mode)
        return mode, "; ".join(problems)
    finally:
        shutil.rmtree(probe.root, onexc=_force_remove)
