"""Shared helpers of the butlerfs benchmarks (``scripts/bench/bench_*.py``).

Timing, page-cache dropping, machine facts, small statistics, markdown tables, and
the replacement of one script's section of ``docs/BENCHMARKS.md``.  Each script owns
the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` and rewrites
only that, so the scripts can run in any order.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

ROOT = Path(__file__).resolve().parents[2]
"""The repository's top directory."""
BENCHMARKS_MD = ROOT / "docs" / "BENCHMARKS.md"
BENCH_DIR = Path(os.environ.get("BUTLERFS_BENCH_DIR", "/var/tmp/butlerfs-bench"))
"""Where repositories and mount points of the benchmarks live (not on tmpfs: cold reads hit disk)."""
VENV_BIN = Path(sys.executable).parent
MIB = 1 << 20

_HEADER = """# butlerfs benchmarks

Each section is written by the script named in it (`scripts/bench/bench_*.py`), which measures
butlerfs and a baseline in the same run and reports their ratio. Rerun a script to refresh its
section; the other sections are left as they are. `make bench` runs them all.
"""


# -- running and timing -------------------------------------------------------------------------


def run(cmd: Sequence[str], *, stdout: int | None = subprocess.DEVNULL, check: bool = True,
        env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Run ``cmd`` and return its wall time in seconds and its result (stderr captured)."""
    start = time.perf_counter()
    result = subprocess.run(list(cmd), stdout=stdout, stderr=subprocess.PIPE, env=env)
    elapsed = time.perf_counter() - start
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.decode()[-2000:]}")
    return elapsed, result


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """Time a block: ``with stopwatch() as t: ...`` then ``t[0]`` is the seconds taken."""
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def can_drop_caches() -> bool:
    """Whether this process may write ``/proc/sys/vm/drop_caches`` (root, writable procfs)."""
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> None:
    """Flush dirty pages and drop the page cache, dentries and inodes (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as stream:
        stream.write("3\n")


def require_root_for_cold() -> None:
    """Exit with a clear message when cold-cache measurements are impossible."""
    if not can_drop_caches():
        sys.exit("these benchmarks drop the page cache: run them as root (echo 3 > /proc/sys/vm/drop_caches)")


# -- statistics and formatting ------------------------------------------------------------------


@dataclass
class Sample:
    """Repeated measurements of one quantity (seconds)."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def __len__(self) -> int:
        return len(self.values)


def seconds(value: float) -> str:
    """Format a duration for a table: ms below a second."""
    if value < 1.0:
        return f"{value * 1e3:.0f} ms" if value >= 0.01 else f"{value * 1e3:.1f} ms"
    return f"{value:.2f} s"


def ratio(value: float) -> str:
    return f"{value:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Return a GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# -- the machine --------------------------------------------------------------------------------


def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def filesystem_of(path: str | os.PathLike[str]) -> str:
    """Return ``device (fstype)`` of the filesystem holding ``path``."""
    best, found = "", "unknown"
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            dev, where, fstype, *_ = line.split()
            if (real == where or real.startswith(where.rstrip("/") + "/")) and len(where) >= len(best):
                best, found = where, f"{dev} ({fstype})"
    return found


def machine_facts(data_path: str | os.PathLike[str]) -> list[str]:
    """Return markdown bullet lines describing the machine and software versions."""
    from importlib.metadata import PackageNotFoundError, version

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return [
        f"- CPU: {os.cpu_count()} cores (nproc {_first_line(['nproc'])}), {cpu}; memory {mem_gib:.0f} GiB",
        f"- Kernel: {platform.release()}; libfuse: {_first_line(['fusermount3', '-V'])}",
        f"- Data on {filesystem_of(data_path)}",
        f"- Python {platform.python_version()}, lsst-daf-butler {pkg('lsst-daf-butler')}, "
        f"mfusepy {pkg('mfusepy')}, butlerfs {pkg('butlerfs')} (commit {git_revision()})",
    ]


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def wait_for_quiet(max_wait: float, threshold: float = 1.0) -> None:
    """Wait up to ``max_wait`` seconds for the 1-minute load average to fall below ``threshold``."""
    deadline = time.monotonic() + max_wait
    if max_wait > 0 and os.getloadavg()[0] >= threshold:
        print(f"Waiting up to {max_wait:.0f} s for the load average ({load_average()}) to fall below "
              f"{threshold} ...", flush=True)
    while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
        time.sleep(5)


def contention_note(at_start: str, cores: int | None = None) -> str:
    """A warning sentence when the machine was busy with other work during the run, else ``""``."""
    cores = cores or os.cpu_count() or 1
    worst = max(float(at_start.split(",")[0]), os.getloadavg()[0])
    if worst < cores * 0.75:
        return ""
    return (f" Caution: the 1-minute load average reached {worst:.1f} on {cores} cores during this run, so "
            "other work competed for the CPU; the wall times (and ratios) are perturbed, the daemon CPU "
            "times much less so.")


def load_line(at_start: str) -> str:
    """A bullet line with the load average at the start (given) and now."""
    return (f"- Load average (1, 5, 15 min) at the start: {at_start}; at the end: {load_average()} "
            "(anything else running competes with the benchmark for the cores)")


def git_revision() -> str:
    """The commit, plus a digest of uncommitted changes to ``butlerfs/`` if there are any."""
    return tree_revision("butlerfs/")


def today() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


# -- docs/BENCHMARKS.md -------------------------------------------------------------------------


def publish(name: str, body: str, no_docs: bool) -> None:
    """Write ``body`` as section ``name`` of docs/BENCHMARKS.md, or only print it (``--no-docs``)."""
    if no_docs:
        print(body)
    else:
        replace_section(name, body)
        print(f"Wrote the '{name}' section of {BENCHMARKS_MD}", flush=True)


def replace_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section delimited by ``<!-- bench:name -->`` markers."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else _HEADER
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- repositories -------------------------------------------------------------------------------

INSTRUMENT = "BenchCam"


def new_repo(repo: Path, datastore_root: str | None = None, registry: str | None = None,
             namespace: str | None = None) -> Any:
    """Make a repository of `ButlerfsFile` datasets holding instrument `INSTRUMENT`.

    Returns the writeable Butler; ``datastore_root`` (e.g. an ``s3://`` URI) moves the
    datastore out of the repository; ``registry`` (a ``postgresql://`` URL) and
    ``namespace`` (its schema) put the registry in a database server.
    """
    from lsst.daf.butler import Butler, Config

    from butlerfs.formatter import storage_class_config

    config = storage_class_config()
    if datastore_root is not None:
        config["datastore"]["root"] = datastore_root
    if registry is not None:
        config["registry"] = {"db": registry, **({"namespace": namespace} if namespace else {})}
    # forceConfigRoot would put an outside datastore root back inside the repository.
    Butler.makeRepo(str(repo), config=Config(config), forceConfigRoot=datastore_root is None)
    butler = Butler.from_config(str(repo), writeable=True)
    butler.registry.insertDimensionData(
        "instrument", dict(name=INSTRUMENT, visit_max=10**7, visit_system=0, exposure_max=10**7,
                           detector_max=1000, class_name="bench.BenchCam"),
    )
    return butler


def write_random(stream: BinaryIO, mib: int) -> None:
    """Write ``mib`` MiB of random bytes, one MiB at a time (incompressible, never cached)."""
    for _ in range(mib):
        stream.write(os.urandom(MIB))


# -- mounts -------------------------------------------------------------------------------------


def bdi_read_ahead_path(mountpoint: str) -> str:
    """Return the sysfs file holding the read-ahead (KiB) of the filesystem at ``mountpoint``."""
    dev = os.stat(mountpoint).st_dev
    return f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"


def set_read_ahead(mountpoint: str, kb: int) -> None:
    with open(bdi_read_ahead_path(mountpoint), "w") as stream:
        stream.write(f"{kb}\n")


def get_read_ahead(mountpoint: str) -> int:
    with open(bdi_read_ahead_path(mountpoint)) as stream:
        return int(stream.read().strip())


def fresh_dir(path: Path) -> Path:
    """Return ``path`` as an empty directory (a mount point)."""
    if path.exists():
        with contextlib.suppress(OSError):
            path.rmdir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def find_tool(name: str) -> str:
    """Return the path of a program: the venv's own first, then ``PATH``."""
    candidate = VENV_BIN / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: run `make setup` first")
    return found


# -- FUSE request counts ------------------------------------------------------------------------


def can_trace_fuse() -> bool:
    """Whether ``perf`` can record the kernel's ``fuse:fuse_request_send`` tracepoint here."""
    if shutil.which("perf") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["perf", "list", "fuse:fuse_request_send"], capture_output=True, text=True)
    return "fuse_request_send" in probe.stdout


def fuse_request_counts(mountpoint: str, cmd: Sequence[str], workdir: Path) -> tuple[float, dict[str, int]]:
    """Run ``cmd`` under ``perf record``; return its wall time and the FUSE requests per opcode.

    Only requests to the connection of ``mountpoint`` count (its device minor number), so
    other FUSE mounts on the machine do not. The wall time includes perf's overhead.
    """
    connection = os.minor(os.stat(mountpoint).st_dev)
    data = workdir / "fuse-requests.perf"
    start = time.perf_counter()
    subprocess.run(["perf", "record", "-q", "-a", "-e", "fuse:fuse_request_send", "-o", str(data), "--",
                    *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    elapsed = time.perf_counter() - start
    script = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, text=True).stdout
    data.unlink(missing_ok=True)
    counts: dict[str, int] = {}
    pattern = re.compile(r"connection (\d+) req \d+ opcode \d+ \((FUSE_\w+)\)")
    for line in script.splitlines():
        match = pattern.search(line)
        if match and int(match.group(1)) == connection:
            counts[match.group(2)] = counts.get(match.group(2), 0) + 1
    return elapsed, dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# -- added for bench_run.py ---------------------------------------------------------------------


def tree_revision(*paths: str) -> str:
    """Like `git_revision`, for the uncommitted changes to other directories (``wrapper``...)."""
    import hashlib

    rev = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    diff = subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD", "--", *paths], capture_output=True).stdout
    if diff:
        digest = hashlib.sha1(diff).hexdigest()[:10]
        rev += f" + uncommitted changes to {', '.join(paths)}, diff sha1 {digest}"
    return rev


# -- an ordinary user (bench_overlay.py, bench_user_read.py) ------------------------------------


def ordinary_user(name: str) -> tuple[int, int, Path]:
    """Return the UID, GID and home of ``name``, set up as ``scripts/ci-as-user.sh`` does (as root).

    The user is created when missing (``useradd --create-home``), and ``/dev/fuse`` is made
    usable by users (0666, as Debian's udev rule makes it; containers often leave it 0600).
    """
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        print(f"Creating the user {name} (as scripts/ci-as-user.sh does)", flush=True)
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", name], check=True)
        entry = pwd.getpwnam(name)
    if os.path.exists("/dev/fuse") and os.stat("/dev/fuse").st_mode & 0o777 != 0o666:
        print("Making /dev/fuse usable by users (0666, as Debian's udev rule does)", flush=True)
        os.chmod("/dev/fuse", 0o666)
    return entry.pw_uid, entry.pw_gid, Path(entry.pw_dir)
