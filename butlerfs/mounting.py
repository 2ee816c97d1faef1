"""Mount and unmount: checks, the background daemon, and the Python API.

A background mount is a separate process (``python -m butlerfs.daemon``) started
before any Butler, thread or client exists in it. It opens the repository, mounts,
and writes one line on an inherited pipe: ``ok`` once the kernel has mounted the
filesystem, or ``error <message>``. The parent waits for that line, so
``butlerfs mount`` returns when the mount is usable, or fails with the reason and
leaves nothing mounted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import psutil

from .errors import UsageError

if TYPE_CHECKING:
    from .artifacts import ArtifactOpener
    from .datastore import Datastore
    from .fetch import Fetcher

__all__ = [
    "Mount",
    "MountOptions",
    "daemons_serving",
    "mount",
    "mounts_under",
    "preflight",
    "serve",
    "spawn",
    "unmount",
    "unmount_all",
    "unmount_under",
]

_LOG = logging.getLogger(__name__)

READY_FD_ENV = "BUTLERFS_READY_FD"
READ_AHEAD_KB = 4096
REMOTE_READ_AHEAD_KB = 256
"""The kernel's read-ahead of a mount with a remote datastore: one cache block, so that the
first read of a header (which the kernel widens to its read-ahead) fetches one block; the
daemon's own read-ahead takes over for sequential reads."""


@dataclasses.dataclass
class MountOptions:
    """Everything a mount needs; serialisable so the daemon gets it verbatim."""

    repo: str
    mountpoint: str
    collections: Sequence[str]
    dataset_types: Sequence[str] = ()
    where: str = ""
    refresh: float = 60.0
    subtree_limit: int = 2_500
    layout: str = "default"
    """``default`` or ``flat`` (no directory for the last dimension)."""
    mtime: str = "ingest"
    """Files' mtime: ``ingest`` (each dataset's ingest date) or ``listed`` (when first listed)."""
    memory_limit: int = 1 << 30
    """Bytes of listings the daemon holds; the least recently used are dropped beyond it."""
    index: bool = True
    """Keep listings in a persistent on-disk index for the next mount."""
    index_dir: str | None = None
    """Where the index lives; default ``<cache dir>/index``."""
    threads: bool = True
    allow_other: bool = False
    read_ahead_kb: int | None = None
    """The kernel's read-ahead for the mount (as root): by default `READ_AHEAD_KB`, or
    `REMOTE_READ_AHEAD_KB` when a datastore is remote."""
    cache_dir: str | None = None
    """Block cache of remote artifacts; default `butlerfs.cache.default_cache_dir`."""
    cache_size: int = 10 << 30
    """Cache size limit in bytes; 0 disables the disk cache."""
    fetch_concurrency: int = 16
    """Most GETs in flight for the whole mount."""
    timeout: float = 30.0
    """Seconds after which a remote read that keeps failing returns EIO."""
    url_lifetime: float | None = None
    """Seconds a URL signed by a Butler server is used at most; default 80% of its stated lifetime."""
    log_file: str | None = None
    log_level: str = "INFO"
    watch_pid: int | None = None
    """Unmount and exit when this process dies (``butlerfs run`` passes its own PID)."""
    cleanup_under: str | None = None
    """With ``watch_pid``: first unmount every overlay or FUSE mount under this directory."""

    def to_json(self) -> str:
        """Serialise for the daemon's command line."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MountOptions:
        """Inverse of `to_json`."""
        return cls(**json.loads(text))


def state_dir() -> str:
    """Return the per-user directory holding daemon logs and PID files."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(base, f"butlerfs-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _state_file(mountpoint: str, suffix: str) -> str:
    key = hashlib.sha1(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return os.path.join(state_dir(), f"{key}.{suffix}")


def _mounted_paths() -> set[str]:
    paths = set()
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 1:
                paths.add(fields[1].encode().decode("unicode_escape"))
    return paths


def _unescape(field: str) -> str:
    r"""Decode the octal escapes (``\040``) of a ``/proc`` mount table field."""
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def mounts_under(directory: str) -> list[tuple[str, str]]:
    """Return the overlay and FUSE mounts strictly under ``directory``, deepest and newest first.

    Other filesystems (a tmpfs the user mounted there, say) are never listed: only what
    butlerfs and its overlays mount.

    Parameters
    ----------
    directory : `str`
        A directory; the directory itself is not included.

    Returns
    -------
    mounts : `list` [`tuple` [`str`, `str`]]
        ``(mount point, filesystem type)`` in the order to unmount them.
    """
    prefix = os.path.realpath(directory).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as table:
        for order, line in enumerate(table):
            fields = line.split()
            if " - " not in line or len(fields) < 5:
                continue
            point = _unescape(fields[4])
            kind = line.split(" - ", 1)[1].split()[0]
            if point.startswith(prefix) and (kind == "overlay" or kind.startswith("fuse")):
                found.append((point.count("/"), order, point, kind))
    found.sort(reverse=True)
    return [(point, kind) for _, _, point, kind in found]


def _umount_point(point: str, kind: str, lazy: bool) -> str | None:
    """Unmount one mount point; return `None` or why it failed."""
    if kind.startswith("fuse"):
        argv = [_fusermount(), "-uz" if lazy else "-u", point]
    else:
        argv = ["umount", "-l", point] if lazy else ["umount", point]
    try:
        result = subprocess.run(argv, capture_output=True, text=True)
    except OSError as err:
        return err.strerror
    if result.returncode == 0:
        return None
    message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "unknown error"
    if kind.startswith("fuse") and ("not connected" in message or "Transport endpoint" in message):
        return _umount_point(point, kind, lazy=True) if not lazy else message
    return message


def unmount_under(directory: str, keep: Sequence[str] = (), busy_wait: float = 2.0) -> list[str]:
    """Unmount every overlay and FUSE mount under ``directory``, deepest first.

    Parameters
    ----------
    directory : `str`
        The directory (itself never unmounted).
    keep : `~collections.abc.Sequence` [`str`], optional
        Mount points to leave alone (the caller's own mount).
    busy_wait : `float`, optional
        Seconds to retry a busy mount before detaching it (see `unmount_all`).

    Returns
    -------
    cleared : `list` [`str`]
        The mount points unmounted or detached.
    """
    kept = {os.path.realpath(point) for point in keep}
    return unmount_all([m for m in mounts_under(directory) if m[0] not in kept], busy_wait)


def unmount_all(mounts: Sequence[tuple[str, str]], busy_wait: float = 2.0) -> list[str]:
    """Unmount ``(mount point, filesystem type)`` pairs in order, retrying busy ones.

    A mount that stays busy for ``busy_wait`` seconds (a process still has its working
    directory there) is detached lazily, so nothing stays in the way of a new run.

    Returns
    -------
    cleared : `list` [`str`]
        The mount points unmounted or detached.
    """
    left = list(mounts)
    cleared: list[str] = []
    deadline = time.monotonic() + busy_wait
    while left:
        lazy = time.monotonic() > deadline
        failed = []
        for point, kind in left:
            problem = _umount_point(point, kind, lazy)
            if problem is None or not _is_mounted(point):
                cleared.append(point)
            elif lazy:
                _LOG.warning("Could not unmount %s: %s", point, problem)
            else:
                failed.append((point, kind))
        if lazy:
            break
        if failed:
            time.sleep(0.1)
        left = failed
    return cleared


def daemons_serving(mountpoint: str) -> list[int]:
    """Return the PIDs of this user's butlerfs daemons serving ``mountpoint``, dead mount or not."""
    target = os.path.realpath(mountpoint)
    found = []
    for process in psutil.process_iter(["cmdline", "uids"]):
        with contextlib.suppress(psutil.Error, ValueError, TypeError, KeyError):
            argv = process.info["cmdline"] or []
            if len(argv) < 2 or "butlerfs.daemon" not in argv[-2] or process.info["uids"].real != os.getuid():
                continue
            if os.path.realpath(json.loads(argv[-1])["mountpoint"]) == target:
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process.pid)
    return found


def _is_mounted(mountpoint: str) -> bool:
    return os.path.realpath(mountpoint) in _mounted_paths() or os.path.abspath(mountpoint) in _mounted_paths()


def _fusermount() -> str:
    for name in ("fusermount3", "fusermount"):
        found = shutil.which(name)
        if found:
            return found
    raise UsageError("no fusermount3 on this machine: install FUSE 3 (Debian: apt-get install fuse3)")


def preflight(mountpoint: str) -> str:
    """Check that FUSE is usable and ``mountpoint`` can take a mount.

    Returns
    -------
    mountpoint : `str`
        The absolute path.

    Raises
    ------
    UsageError
        With a one-line reason and what to do about it.
    """
    if not os.path.exists("/dev/fuse"):
        raise UsageError(
            "no /dev/fuse on this machine: load the fuse module (modprobe fuse) or run "
            "the container with --device /dev/fuse"
        )
    _fusermount()
    path = os.path.abspath(mountpoint)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(
            f"mount point {mountpoint} does not exist: create it with mkdir -p {mountpoint}"
        ) from None
    except OSError as err:
        if err.errno == errno.ENOTCONN:
            raise UsageError(
                f"{mountpoint} is a stale mount whose daemon died: run butlerfs umount {mountpoint}"
            ) from None
        raise UsageError(f"cannot use mount point {mountpoint}: {err.strerror}") from None
    if not os.path.isdir(path):
        raise UsageError(f"mount point {mountpoint} is not a directory: give an empty directory")
    del st
    if _is_mounted(path):
        raise UsageError(
            f"{mountpoint} is already a mount point: unmount it first (butlerfs umount {mountpoint})"
        )
    if os.listdir(path):
        raise UsageError(f"mount point {mountpoint} is not empty: give an empty directory")
    return path


def _tune_read_ahead(st_dev: int, kb: int) -> None:
    """Raise the mount's kernel read-ahead; FUSE can only lower it from its side."""
    sysfs = f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb"
    try:
        with open(sysfs, "w") as stream:
            stream.write(str(kb))
        _LOG.debug("Set %s to %d", sysfs, kb)
    except OSError as err:  # not root, or sysfs read-only: a slower mount still works
        _LOG.info("Could not raise read-ahead (%s); sequential reads will be slower", err)


def make_opener(options: MountOptions, datastore: Datastore) -> ArtifactOpener:
    """Return the artifact opener of a mount, checking remote datastores now.

    The fetcher (threads, cache directory, S3 or HTTP client) is made only if the
    datastore is remote, or on the first remote artifact: a POSIX mount never starts
    one. Artifacts served by a Butler server are read through the URLs it signs
    (`~butlerfs.http_store.HttpStore`), S3 objects with boto3
    (`~butlerfs.remote.ObjectStore`); both under the same retry policy.

    Raises
    ------
    UsageError
        For an unusable cache directory, unknown bucket, bad credentials or an
        unreachable endpoint.
    """
    from .artifacts import ArtifactOpener

    roots = datastore.roots()
    auth = datastore.server_auth()
    http = auth is not None or any(root.startswith(("https://", "http://")) for root in roots)

    def fetcher() -> Fetcher:
        from .cache import BlockCache, default_cache_dir
        from .fetch import Fetcher, Store
        from .remote import ObjectStore, RetryPolicy

        policy = RetryPolicy.within(options.timeout)
        store: Store
        if http:
            from .http_store import HttpStore

            store = HttpStore(
                policy,
                max_connections=2 * options.fetch_concurrency,
                auth=auth,
                url_lifetime=options.url_lifetime,
            )
        else:
            store = ObjectStore(policy, max_connections=2 * options.fetch_concurrency)
        cache = None
        if options.cache_size > 0:
            cache_dir = options.cache_dir or default_cache_dir()
            try:
                cache = BlockCache(cache_dir, options.cache_size)
            except OSError as err:
                raise UsageError(
                    f"cannot use cache directory {cache_dir}: {err.strerror} (see --cache-dir)"
                ) from None
        return Fetcher(store, cache, concurrency=options.fetch_concurrency, timeout=options.timeout)

    opener = ArtifactOpener(fetcher)
    remote = [root for root in roots if root.startswith("s3://")]
    if remote or http:
        store = opener.fetcher().store  # the cache directory and the client, checked at mount time
        for root in remote:
            from .remote import ObjectStore

            assert isinstance(store, ObjectStore)
            store.check_access(root)
    return opener


def index_dir(options: MountOptions) -> str:
    """Return the directory of the persistent listing index for ``options``."""
    from .cache import default_cache_dir

    return options.index_dir or os.path.join(options.cache_dir or default_cache_dir(), "index")


def serve(options: MountOptions, on_mounted: Callable[[], None] | None = None) -> None:
    """Open the repository and serve the mount in this process until unmounted.

    Parameters
    ----------
    options : `MountOptions`
        What to mount where.
    on_mounted : callable, optional
        Called (from another thread) once the mount is usable.
    """
    from .fuse_ops import run_fuse
    from .registry import RepoIndex
    from .source import ButlerSource

    index = RepoIndex(options.repo, options.collections, options.dataset_types, options.where)
    roots = index.datastore.roots()
    opener = make_opener(options, index.datastore)
    read_ahead_kb = options.read_ahead_kb
    if read_ahead_kb is None:
        remote = any(not root.startswith("file:") for root in roots)
        read_ahead_kb = REMOTE_READ_AHEAD_KB if remote else READ_AHEAD_KB
    source = ButlerSource(
        index,
        refresh=options.refresh,
        subtree_limit=options.subtree_limit,
        opener=opener,
        memory_limit=options.memory_limit,
        index_dir=index_dir(options) if options.index else None,
        layout=options.layout,  # type: ignore[arg-type]
        mtime=options.mtime,  # type: ignore[arg-type]
    )

    def after_mount() -> None:
        # The kernel answers a stat of the mount point only after init returns; a
        # failed stat means libfuse gave up after init, and serve() reports that.
        try:
            st_dev = os.stat(options.mountpoint).st_dev
        except OSError as err:
            _LOG.error("Mount point %s unusable after mounting: %s", options.mountpoint, err)
            return
        if os.geteuid() == 0 and read_ahead_kb:
            _tune_read_ahead(st_dev, read_ahead_kb)
        _LOG.info("Mounted %s at %s", options.repo, options.mountpoint)
        if on_mounted is not None:
            on_mounted()
        # A remount checks what its on-disk index holds now, before the first listings ask.
        source.prevalidate()

    def on_ready() -> None:
        threading.Thread(target=after_mount, name="butlerfs-ready", daemon=True).start()

    log_start = _log_size(options.log_file)
    try:
        run_fuse(
            source,
            options.mountpoint,
            on_ready=on_ready,
            threads=options.threads,
            allow_other=options.allow_other,
        )
    except RuntimeError as err:
        raise UsageError(_mount_failure(options, str(err), _log_since(options.log_file, log_start))) from None


_HINTS = (
    ("user_allow_other", "add user_allow_other to /etc/fuse.conf (as root), or mount without --allow-other"),
    (
        "failed to open /dev/fuse",
        "/dev/fuse is not usable by you: ask your administrator to make it 0666, as Debian does",
    ),
    ("fusermount", "check that fusermount3 is installed setuid root (Debian: apt-get install fuse3)"),
    (
        "Operation not permitted",
        "this machine does not let users mount FUSE filesystems: ask your administrator",
    ),
)
"""Fixes for libfuse's and fusermount3's messages, first match wins."""


def _log_size(log_file: str | None) -> int:
    try:
        return os.path.getsize(log_file) if log_file else 0
    except OSError:
        return 0


def _log_since(log_file: str | None, offset: int) -> list[str]:
    """Lines libfuse or fusermount3 wrote to the daemon's stderr (its log) since ``offset``."""
    if not log_file:
        return []
    with contextlib.suppress(OSError), open(log_file, "rb") as stream:
        stream.seek(offset)
        text = stream.read(65536).decode(errors="replace")
        return [
            line.strip()
            for line in text.splitlines()
            if line.strip().startswith(("fuse:", "fusermount", "fuse-")) or "fusermount" in line
        ]
    return []


def _mount_failure(options: MountOptions, code: str, said: list[str]) -> str:
    """One line: libfuse's own words, the fix when known, and where the log is."""
    cause = "; ".join(dict.fromkeys(said)) or f"libfuse error {code}, no message"
    hint = next((fix for needle, fix in _HINTS if needle in cause), "")
    where = f" (log: {options.log_file})" if options.log_file else ""
    return f"could not mount {options.mountpoint}: {cause}" + (f": {hint}" if hint else "") + where


def _read_ready_line(fd: int, process: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    data = b""
    os.set_blocking(fd, False)
    while b"\n" not in data:
        if time.monotonic() > deadline:
            process.kill()
            return f"error the mount daemon did not report within {timeout:.0f} s"
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.02)
            continue
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def spawn(options: MountOptions, timeout: float = 300.0) -> int:
    """Start a daemon serving ``options`` and wait until it has mounted.

    Returns
    -------
    pid : `int`
        The daemon's process ID.

    Raises
    ------
    UsageError
        If the daemon reports an error or dies; nothing is left mounted.
    """
    options.mountpoint = preflight(options.mountpoint)
    if os.path.exists(options.repo):
        options.repo = os.path.abspath(options.repo)
    log_file = options.log_file or _state_file(options.mountpoint, "log")
    options.log_file = log_file
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **{READY_FD_ENV: str(write_fd)})
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "butlerfs.daemon", options.to_json()],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(write_fd,),
            env=env,
            start_new_session=True,
            cwd="/",
        )
    os.close(write_fd)
    try:
        line = _read_ready_line(read_fd, process, timeout)
    finally:
        os.close(read_fd)
    if line == "ok":
        with open(_state_file(options.mountpoint, "pid"), "w") as stream:
            stream.write(str(process.pid))
        return process.pid
    with contextlib.suppress(ProcessLookupError):
        process.wait(timeout=10)
    if _is_mounted(options.mountpoint):
        unmount(options.mountpoint)
    if line.startswith("error "):
        raise UsageError(line[len("error ") :])
    raise UsageError(f"the mount daemon exited with status {process.returncode}: see {log_file}")


def unmount(mountpoint: str, timeout: float = 30.0, *, busy_wait: float = 0.0, lazy: bool = False) -> None:
    """Unmount ``mountpoint``, also when its daemon died, and wait for the daemon to exit.

    Parameters
    ----------
    mountpoint : `str`
        The mount point.
    timeout : `float`, optional
        Seconds to wait for the daemon to exit.
    busy_wait : `float`, optional
        Seconds to keep retrying while the mount is busy (a process that just
        finished may still hold it, e.g. an overlay's helper).
    lazy : `bool`, optional
        Detach a mount that stays busy (``fusermount3 -uz``) instead of failing:
        for a mount this process made and must not leave behind.

    Raises
    ------
    UsageError
        If ``mountpoint`` is not mounted or stays busy (and ``lazy`` is false).
    """
    path = os.path.abspath(mountpoint)
    fusermount = _fusermount()
    if not _is_mounted(path):
        raise UsageError(f"{mountpoint} is not mounted")
    deadline = time.monotonic() + busy_wait
    while True:
        result = subprocess.run([fusermount, "-u", path], capture_output=True, text=True)
        if result.returncode == 0:
            break
        message = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "unknown error"
        if "not connected" in message or "Transport endpoint" in message:
            subprocess.run([fusermount, "-uz", path], capture_output=True, text=True)
            break
        if time.monotonic() < deadline:
            time.sleep(0.1)
            continue
        if lazy:
            _LOG.warning("%s stays busy (%s): detaching it", mountpoint, message)
            subprocess.run([fusermount, "-uz", path], capture_output=True, text=True)
            break
        raise UsageError(
            f"cannot unmount {mountpoint}: {message} (is a process still using it? see fuser -vm)"
        )
    _wait_for_daemon(path, timeout)


def _daemon_alive(pid: int) -> bool:
    """Whether ``pid`` is still a running butlerfs daemon (not exited, reaped or a zombie)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and "butlerfs.daemon" in " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _wait_for_daemon(mountpoint: str, timeout: float) -> None:
    pid_file = _state_file(mountpoint, "pid")
    try:
        with open(pid_file) as stream:
            pid = int(stream.read().strip())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + timeout
    while _daemon_alive(pid):
        if time.monotonic() > deadline:
            _LOG.warning("Daemon %d did not exit after unmount; terminating it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            break
        time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        os.remove(pid_file)


@dataclasses.dataclass(frozen=True)
class Mount:
    """A live background mount, as `mount` yields it."""

    mountpoint: str
    pid: int

    def path(self, *parts: str) -> str:
        """Return a path inside the mount."""
        return os.path.join(self.mountpoint, *parts)


@contextlib.contextmanager
def mount(
    repo: str,
    mountpoint: str,
    collections: Sequence[str],
    dataset_types: Sequence[str] = (),
    where: str = "",
    **kwargs: object,
) -> Iterator[Mount]:
    """Mount a repository in the background for the duration of a ``with`` block.

    Parameters
    ----------
    repo : `str`
        Repository path or URI.
    mountpoint : `str`
        An empty directory.
    collections : `~collections.abc.Sequence` [`str`]
        Collection search path.
    dataset_types : `~collections.abc.Sequence` [`str`], optional
        Names or glob patterns of the dataset types to show.
    where : `str`, optional
        Query expression constraining the datasets shown.
    **kwargs
        Other `MountOptions` fields (``refresh``, ``subtree_limit``, ...).

    Yields
    ------
    mount : `Mount`
        The live mount; unmounted when the block exits.
    """
    options = MountOptions(repo, mountpoint, list(collections), list(dataset_types), where, **kwargs)  # type: ignore[arg-type]
    pid = spawn(options)
    try:
        yield Mount(options.mountpoint, pid)
    finally:
        # This process made the mount: never leave it behind, even if a helper still holds it.
        unmount(options.mountpoint, busy_wait=5.0, lazy=True)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)  # reap our child: a zombie would look alive
