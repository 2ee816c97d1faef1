"""Walk whole mounts of 10^5 and 10^6 datasets vs ``butler query-datasets``, on SQLite and PostgreSQL.

Builds (once, cached under ``$BUTLERFS_BENCH_DIR/tree-N[-pg]``) a repository with N datasets
of one dataset type ``calexp`` (dimensions instrument, visit, detector: N/100 visits x 100
detectors), each a small file, ingested in place in batches; the PostgreSQL registries live
in a server kept under ``$BUTLERFS_BENCH_DIR/pg`` (Debian's binaries, `scripts/pgserver.py`),
or in the one ``--pg-url`` names. Then measures, as whole commands timed from outside:

* baseline: ``butler query-datasets REPO calexp --collections RUN --find-first --limit 0``;
* for each mount variant (the defaults; ``--mtime listed``; ``--layout flat --mtime listed``),
  on a first mount with an empty listing index: ``butlerfs mount`` (invocation to return),
  the first ``ls`` of a leaf directory, ``find MNT -type f -printf '%s %T@\\n'`` (a stat of
  every file), the daemon's CPU time and memory after it; then on a remount that finds the
  index: the same, and how many registry listing queries the walk made;
* a walk with ``--memory-limit`` a quarter of what the listings need (evictions, memory);
* the FUSE requests a walk sends (``perf``), and a walk after the ``--refresh`` interval
  expired, on the smallest repository.

Writes the ``bench:tree`` section of ``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import _common as c
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pgserver  # noqa: E402  (scripts/pgserver.py)

SECTION = "tree"
RUN = "bench/tree"
INSTRUMENT = c.INSTRUMENT
DATASET_TYPE = "calexp"
DETECTORS = 100
BATCH = 20_000
STALE_REFRESH = 5.0  # seconds: the refresh interval of the "after refresh expired" measurement
LOADED = re.compile(r"Loaded .* from the (registry|index): .* in ([0-9.]+) s$")
PG_SERVER_DIR = "pg"


# -- the repository -----------------------------------------------------------------------------


def visits_for(n: int) -> list[int]:
    return [100_000 + v for v in range((n + DETECTORS - 1) // DETECTORS)]


def build_repo(root: Path, n: int, registry: str | None = None) -> dict[str, float]:
    """Create the repository at ``root / "repo"``; return the seconds each step took.

    ``registry`` (a ``postgresql://`` URL) puts the registry in that database, in a schema
    named after the repository (dropped first if it exists).
    """
    from lsst.daf.butler import DataCoordinate, DatasetIdGenEnum, DatasetRef, DatasetType, FileDataset

    from butlerfs.formatter import FileArtifactFormatter

    steps: dict[str, float] = {}
    t = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        steps[name] = now - t
        t = now
        print(f"  {name}: {steps[name]:.1f} s", flush=True)

    c.remove_tree(root)
    repo = root / "repo"
    namespace = None
    if registry is not None:
        namespace = f"tree_{n}"
        drop_schema(registry, namespace)
    butler = c.new_repo(repo, registry=registry, namespace=namespace)
    registry = butler.registry
    registry.insertDimensionData("physical_filter", dict(instrument=INSTRUMENT, name="r_bench", band="r"))
    registry.insertDimensionData("day_obs", dict(instrument=INSTRUMENT, id=20240101))
    registry.insertDimensionData(
        "detector", *[dict(instrument=INSTRUMENT, id=d, full_name=f"D{d:03d}") for d in range(DETECTORS)])
    visits = visits_for(n)
    registry.insertDimensionData("visit", *[
        dict(instrument=INSTRUMENT, id=v, name=str(v), physical_filter="r_bench", day_obs=20240101)
        for v in visits])
    # Queries joining visit and detector need these rows (the region may be empty).
    registry.insertDimensionData("visit_detector_region", *[
        dict(instrument=INSTRUMENT, visit=v, detector=d) for v in visits for d in range(DETECTORS)])
    dataset_type = DatasetType(DATASET_TYPE, ("instrument", "visit", "detector"), "ButlerfsFile",
                               universe=butler.dimensions)
    registry.registerDatasetType(dataset_type)
    registry.registerRun(RUN)
    step("dimension records")

    # Small artifacts of varying size, written inside the datastore root and ingested in place
    # (transfer=None): relative paths, as a normal repository records them.
    files = repo / "files"
    data_ids = [(v, d) for v in visits for d in range(DETECTORS)][:n]
    for v in visits:
        (files / f"visit_{v}").mkdir(parents=True)
    paths = []
    for v, d in data_ids:
        path = files / f"visit_{v}" / f"calexp_{v}_{d}.fits"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"%d %d\n" % (v, d) + b"\0" * (2880 + 7 * d))
        os.close(fd)
        paths.append(str(path))
    step("artifact files")

    universe = butler.dimensions
    datasets = [
        FileDataset(
            path=path,
            refs=[DatasetRef(dataset_type,
                             DataCoordinate.standardize(instrument=INSTRUMENT, visit=v, detector=d,
                                                        universe=universe),
                             run=RUN, id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN)],
            formatter=FileArtifactFormatter,
        )
        for path, (v, d) in zip(paths, data_ids, strict=True)
    ]
    for start in range(0, len(datasets), BATCH):
        butler.ingest(*datasets[start : start + BATCH], transfer=None)
    step("ingest")
    butler.close()
    return steps


def drop_schema(registry: str, namespace: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(registry)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE'))
    engine.dispose()


def repo_root(n: int, registry: str | None) -> Path:
    return c.BENCH_DIR / (f"tree-{n}" if registry is None else f"tree-{n}-pg")


def ensure_repo(
    n: int, rebuild: bool, registry: str | None = None
) -> tuple[Path, dict[str, float] | None, str]:
    """Return the cached repository for ``n`` datasets, building it if needed.

    With ``registry`` (a ``postgresql://`` URL) the registry lives in that server; the
    repository is reused only if it was built against the same URL.
    """
    root = repo_root(n, registry)
    marker = root / "built.json"
    if marker.exists() and not rebuild:
        info = json.loads(marker.read_text())
        if info.get("registry") == registry:
            print(f"Reusing {root} (built {info['built']}; --rebuild to rebuild)", flush=True)
            return root / "repo", info["steps"], info["built"]
    print(f"Building a repository of {n} datasets under {root} ...", flush=True)
    steps = build_repo(root, n, registry)
    built = c.today()
    marker.write_text(json.dumps({"n": n, "steps": steps, "built": built, "registry": registry}))
    return root / "repo", steps, built


# -- the PostgreSQL server ----------------------------------------------------------------------


class KeptServer(pgserver.PostgresServer):
    """A `pgserver.PostgresServer` whose data stays in ``directory`` (and port) between runs.

    Building a repository of 10^6 datasets takes the better part of an hour: the benchmark
    keeps it, and the server's data with it.
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        port_file = directory / "port"
        port = int(port_file.read_text()) if port_file.exists() else pgserver.free_port()
        port_file.write_text(str(port))
        self.port = port
        self.password = None
        self._durable = False
        self._bindir = pgserver.find_bindir()
        self._account = pgserver._service_account()
        self.directory = directory
        self.data = directory / "data"
        self.log = directory / "postgres.log"
        self.process = None
        self._databases: set[str] = set()
        pgserver._LIVE.add(self)
        if self._account is not None:
            os.chown(directory, self._account.pw_uid, self._account.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._initdb()
            self.start()
            self.create_database("bench")
        else:
            self.start()

    def cleanup(self) -> None:
        """Stop the server; keep its data."""
        self.stop()
        pgserver._LIVE.discard(self)


# -- measurements -------------------------------------------------------------------------------


def query_datasets(repo: Path, *extra: str) -> float:
    cmd = [c.find_tool("butler"), "query-datasets", str(repo), DATASET_TYPE, "--collections", RUN,
           "--find-first", "--limit", "0", *extra]
    elapsed, _ = c.run(cmd)
    return elapsed


def count_lines_of(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd``, count its output lines; return wall seconds and the count."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {proc.stderr.decode()[-2000:]}")
    return elapsed, proc.stdout.count(b"\n")


def find_command(paths: str | list[str]) -> list[str]:
    return ["find", *([paths] if isinstance(paths, str) else paths), "-type", "f", "-printf", r"%s %T@\n"]


class Mounted:
    """A mount made with the ``butlerfs`` command, timed, with its daemon and log."""

    def __init__(self, repo: Path, mountpoint: Path, options: list[str], log: Path, cache: Path) -> None:
        self.mountpoint = str(c.fresh_dir(mountpoint))
        self.log = log
        self.log_offset = log.stat().st_size if log.exists() else 0
        cmd = [c.find_tool("butlerfs"), "mount", str(repo), self.mountpoint, "-c", RUN,
               "--log-level", "DEBUG", "--log-file", str(log), "--cache-dir", str(cache), *options]
        self.startup, result = c.run(cmd, stdout=subprocess.PIPE)
        match = re.search(rb"daemon (\d+)", result.stdout)
        self.daemon = psutil.Process(int(match.group(1))) if match else None
        self.rss_at_start = self.rss()
        self.profile = ""

    def cpu(self) -> float:
        if self.daemon is None:
            return float("nan")
        times = self.daemon.cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        return self.daemon.memory_info().rss if self.daemon is not None else 0

    def stats(self) -> dict[str, object]:
        """The mount's counters (``user.butlerfs.stats``)."""
        return json.loads(os.getxattr(self.mountpoint, "user.butlerfs.stats"))

    def loads(self) -> dict[str, float]:
        """Loads logged since the last call: counts and seconds, from the registry and the index."""
        found = {"registry": 0.0, "index": 0.0, "registry_s": 0.0, "index_s": 0.0}
        with open(self.log) as stream:
            stream.seek(self.log_offset)
            for line in stream:
                match = LOADED.search(line.rstrip())
                if match:
                    found[match.group(1)] += 1
                    found[match.group(1) + "_s"] += float(match.group(2))
            self.log_offset = stream.tell()
        return found

    def unmount(self) -> None:
        c.run([c.find_tool("butlerfs"), "umount", self.mountpoint])


@contextlib.contextmanager
def mounted(repo: Path, mountpoint: Path, options: list[str], log: Path, cache: Path) -> Iterator[Mounted]:
    m = Mounted(repo, mountpoint, options, log, cache)
    try:
        yield m
    finally:
        m.unmount()


@dataclass
class Walk:
    """One timed walk of a mount and what the daemon did during it."""

    wall: float
    cpu: float
    rss: int
    rss_growth: int
    listing_bytes: int
    loads: dict[str, float]
    stats: dict[str, object]
    rss_forgotten: int
    """RSS once the kernel dropped its cached entries (libfuse frees a node per inode forgotten)."""


PROFILE_CATEGORIES = [
    ("ingest dates (astropy `Time` per row)", ["nsec_to_astropy", "astropy/time"]),
    ("datastore records (`RepoIndex._artifacts`)", ["RepoIndex._artifacts"]),
    ("Butler query rows (`general()`)", ["GeneralQueryResults.__iter__"]),
    ("other registry calls (counts, distinct values, state checks)", ["registry.py"]),
    ("packing listings (`Chunk.build`)", ["Chunk.build"]),
    ("the listing index (SQLite, zlib)", ["index.py", "Chunk.from_bytes", "Chunk.to_bytes"]),
    ("names and attributes of entries", ["Chunk.files", "_file_entries", "Chunk.subdirectories", "_entries"]),
    ("path resolution", ["_lookup", "_child"]),
    ("FUSE callbacks (mfusepy, ctypes)", ["readdir_fuse_3", "FUSE._wrapper", "fgetattr"]),
]


def profiled(m: Mounted, work: Path) -> tuple[subprocess.Popen[bytes] | None, Path]:
    """Start ``py-spy record`` on the daemon (if py-spy is installed)."""
    out = work / "profile.txt"
    tool = c.VENV_BIN / "py-spy"
    if m.daemon is None or not tool.exists():
        return None, out
    cmd = [str(tool), "record", "-p", str(m.daemon.pid), "-f", "raw", "-r", "100", "-o", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out


def profile_table(raw: Path) -> str:
    """Where the daemon's busy samples went, by category (idle threads and imports left out)."""
    counts: dict[str, int] = {}
    busy = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        idle = not stack.strip() or frames[-1].startswith("FUSE.__init__")  # libfuse's loop, native waits
        if not n.isdigit() or idle or "_find_and_load" in stack:
            continue
        busy += int(n)
        name = next((k for k, keys in PROFILE_CATEGORIES if any(key in stack for key in keys)), "other")
        counts[name] = counts.get(name, 0) + int(n)
    if not busy:
        return "(no samples)"
    return c.table(["where", "share of the daemon's busy samples"],
                   [[k, f"{100 * v / busy:.0f}%"] for k, v in sorted(counts.items(), key=lambda kv: -kv[1])])


def walk(m: Mounted, path: str | list[str], expect: int, profile: Path | None = None) -> Walk:
    cpu = m.cpu()
    m.loads()
    spy, raw = profiled(m, profile) if profile is not None else (None, Path())
    elapsed, count = count_lines_of(find_command(path))
    if spy is not None:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=120)
        if raw.exists():
            m.profile = profile_table(raw)
    if count != expect:
        raise RuntimeError(f"find listed {count} files, expected {expect}")
    stats = m.stats()
    rss = m.rss()
    # The kernel forgets cached entries (and libfuse its node for each) only under memory
    # pressure: ask it to, and see how much of the daemon's memory was libfuse's.
    with open("/proc/sys/vm/drop_caches", "w") as stream:
        stream.write("2\n")
    time.sleep(1.0)
    return Walk(elapsed, m.cpu() - cpu, rss, rss - m.rss_at_start, int(stats.get("listing_bytes", 0)),
                m.loads(), stats, m.rss())


def leaf_dir(mountpoint: str, n: int, flat: bool = False) -> str:
    """A directory holding one file (flat: a detector's), deep in the tree."""
    visit = visits_for(n)[-1]
    parts = [mountpoint, DATASET_TYPE, f"instrument_{INSTRUMENT}", f"detector_{DETECTORS // 2}"]
    return os.path.join(*parts) if flat else os.path.join(*parts, f"visit_{visit}")


def detector_dir(mountpoint: str, detector: int) -> str:
    return os.path.join(mountpoint, DATASET_TYPE, f"instrument_{INSTRUMENT}", f"detector_{detector}")


VARIANTS = {
    "defaults": ("defaults", []),
    "listed": ("`--mtime listed`", ["--mtime", "listed"]),
    "flat": ("`--layout flat --mtime listed`", ["--layout", "flat", "--mtime", "listed"]),
}


@dataclass
class Trial:
    """One variant on one repository: first mount (empty index) and remount (index kept)."""

    startup: c.Sample = field(default_factory=c.Sample)
    ls_leaf: c.Sample = field(default_factory=c.Sample)
    first: list[Walk] = field(default_factory=list)
    re_startup: c.Sample = field(default_factory=c.Sample)
    re_ls_leaf: c.Sample = field(default_factory=c.Sample)
    again: list[Walk] = field(default_factory=list)


def med(values: list[float]) -> float:
    return statistics.median(values)


def mwall(walks: list[Walk]) -> float:
    return med([w.wall for w in walks])


def measure_repo(repo: Path, n: int, reps: int, work: Path, trace: bool, stale: bool,
                 variants: list[str], bounded_walk: bool, profile: bool) -> dict[str, object]:
    """Everything measured on one repository."""
    mountpoint = c.BENCH_DIR / "mnt-tree"
    log = work / "daemon.log"
    with contextlib.suppress(FileNotFoundError):
        log.unlink()
    print(f"  baseline: butler query-datasets, {reps} repetitions ...", flush=True)
    query_datasets(repo)  # warm the registry into the page cache, as the mounts will find it
    baseline = c.Sample()
    for _ in range(reps):
        baseline.add(query_datasets(repo))
    print(f"    {baseline.median:.2f} s", flush=True)
    trials: dict[str, Trial] = {}
    profiles: dict[str, str] = {}
    for tag, options in (VARIANTS[v] for v in variants):
        flat = "flat" in options
        trial = trials[tag] = Trial()
        for _ in range(reps):
            cache = work / "cache"
            c.remove_tree(cache)  # an empty listing index
            c.drop_caches()
            with mounted(repo, mountpoint, options, log, cache) as m:
                trial.startup.add(m.startup)
                trial.ls_leaf.add(c.run(["ls", leaf_dir(m.mountpoint, n, flat)])[0])
            c.remove_tree(cache)  # the walk starts from an empty index too
            c.drop_caches()
            with mounted(repo, mountpoint, options, log, cache) as m:
                sample_in = work if profile and not profiles.get(tag) else None
                trial.first.append(walk(m, m.mountpoint, n, sample_in))
                if m.profile:
                    profiles[tag] = m.profile
            c.drop_caches()
            with mounted(repo, mountpoint, options, log, cache) as m:  # the index is kept
                trial.re_startup.add(m.startup)
                trial.re_ls_leaf.add(c.run(["ls", leaf_dir(m.mountpoint, n, flat)])[0])
            c.drop_caches()
            with mounted(repo, mountpoint, options, log, cache) as m:
                trial.again.append(walk(m, m.mountpoint, n))
            f, a = trial.first[-1], trial.again[-1]
            print(f"  {tag}: mount {trial.startup.values[-1]:.2f} s, "
                  f"ls leaf {trial.ls_leaf.values[-1]:.3f} s, "
                  f"find {f.wall:.1f} s (cpu {f.cpu:.1f} s, rss {f.rss >> 20} MiB, listings "
                  f"{f.listing_bytes >> 20} MiB); remount {trial.re_startup.values[-1]:.2f} s, ls leaf "
                  f"{trial.re_ls_leaf.values[-1]:.3f} s, find {a.wall:.1f} s, registry loads "
                  f"{a.loads['registry']:.0f}", flush=True)

    # A memory limit of a quarter of what the listings need: evictions, reloads from the index.
    bounded = bounded_again = None
    limit = 0
    if bounded_walk:
        tag, options = VARIANTS["listed"]
        need = med([w.listing_bytes for t in trials.values() for w in t.first])
        limit = max(int(need // 4), 1 << 20)
        cache = work / "cache"
        c.drop_caches()
        with mounted(repo, mountpoint, [*options, "--memory-limit", str(limit)], log, cache) as m:
            bounded = walk(m, m.mountpoint, n)
            bounded_again = walk(m, m.mountpoint, n)
        print(f"  memory limit {limit >> 20} MiB: find {bounded.wall:.1f} s, "
              f"listings {bounded.listing_bytes >> 20} "
              f"MiB, rss {bounded.rss >> 20} MiB; again {bounded_again.wall:.1f} s", flush=True)

    requests: dict[str, dict[str, int]] = {}
    if trace and c.can_trace_fuse():
        for tag, options in (VARIANTS["listed"], VARIANTS["flat"]):
            cache = work / "cache"
            c.drop_caches()
            with mounted(repo, mountpoint, options, log, cache) as m:
                _, requests[tag] = c.fuse_request_counts(m.mountpoint, find_command(m.mountpoint), work)

    refresh: dict[str, Walk] = {}
    if stale:
        per_detector = n // DETECTORS
        cache = work / "cache"
        with mounted(repo, mountpoint, ["--refresh", str(STALE_REFRESH)], log, cache) as m:
            path = detector_dir(m.mountpoint, 3)
            refresh["first"] = walk(m, path, per_detector)
            time.sleep(STALE_REFRESH + 1.0)
            refresh["expired"] = walk(m, path, per_detector)
    return dict(baseline=baseline, trials=trials, limit=limit, bounded=bounded, bounded_again=bounded_again,
                requests=requests, refresh=refresh, profiles=profiles)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="100000,1000000",
                        help="comma-separated repository sizes (default: %(default)s)")
    parser.add_argument("--registries", default="sqlite,postgresql",
                        help="comma-separated: sqlite, postgresql (default: %(default)s)")
    parser.add_argument("--pg-url", default=None,
                        help="use this PostgreSQL database (postgresql://...), not a kept private server")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5000 datasets on SQLite, once")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions (default 3 below 10^6 datasets, 1 from 10^6; 1 with --quick)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached repositories")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated mount variants (default: %(default)s)")
    parser.add_argument("--no-bounded-walk", action="store_true",
                        help="skip the walk under a memory limit")
    parser.add_argument("--no-profile", action="store_true",
                        help="do not sample the daemon with py-spy during each variant's first walk")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the machine's load average to fall below 1")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    sizes = [5_000] if args.quick else [int(x) for x in args.datasets.split(",")]
    registries = ["sqlite"] if args.quick else args.registries.split(",")
    c.require_root_for_cold()
    c.wait_for_quiet(args.wait_idle)
    facts, load_at_start = c.machine_facts(c.BENCH_DIR), c.load_average()
    started = time.perf_counter()
    server = None
    results: dict[tuple[str, int], dict[str, object]] = {}
    builds: dict[tuple[str, int], str] = {}
    try:
        pg_url = args.pg_url
        if "postgresql" in registries and pg_url is None:
            server = KeptServer(c.BENCH_DIR / PG_SERVER_DIR)
            pg_url = server.url("bench")
        for kind in registries:
            for n in sizes:
                reps = args.reps or (1 if args.quick or n >= 1_000_000 else 3)
                url = pg_url if kind == "postgresql" else None
                print(f"{kind}, {n:,} datasets:", flush=True)
                repo, steps, built = ensure_repo(n, args.rebuild, url)
                steps_text = ", ".join(f"{k} {v:.0f} s" for k, v in (steps or {}).items())
                builds[(kind, n)] = f"built {built}: {steps_text}"
                work = repo_root(n, url)
                results[(kind, n)] = measure_repo(repo, n, reps, work, trace=n == min(sizes),
                                                  stale=n == min(sizes), variants=args.variants.split(","),
                                                  bounded_walk=not args.no_bounded_walk,
                                                  profile=not args.no_profile)
    finally:
        with contextlib.suppress(OSError):
            (c.BENCH_DIR / "mnt-tree").rmdir()
        if server is not None:
            server.cleanup()
    body = report(results, builds, args, facts, load_at_start, started)
    c.publish(SECTION, body, args.no_docs)
    return 0


def report(results: dict[tuple[str, int], dict[str, object]], builds: dict[tuple[str, int], str],
           args: argparse.Namespace, facts: list[str], load_at_start: str, started: float) -> str:
    def secs(x: float) -> str:
        return c.seconds(x)

    def per_ds(total: float, n: int) -> str:
        return f"{total / n:.0f} B"

    sections = []
    verdicts = []
    for (kind, n), r in results.items():
        baseline = r["baseline"]
        trials = r["trials"]
        assert isinstance(baseline, c.Sample) and isinstance(trials, dict)
        base = baseline.median
        rows = []
        for tag, t in trials.items():
            f, a = t.first, t.again
            rows.append([
                tag, secs(t.startup.median), secs(t.ls_leaf.median),
                f"{secs(med([w.wall for w in f]))} ({med([w.wall for w in f]) / base:.2f}x)",
                f"{med([w.cpu for w in f]):.1f} s",
                f"{med([w.rss for w in f]) / 2**20:.0f} MiB ({per_ds(med([w.rss_growth for w in f]), n)}); "
                f"{med([w.rss_forgotten for w in f]) / 2**20:.0f} MiB",
                per_ds(med([w.listing_bytes for w in f]), n),
                secs(t.re_startup.median), secs(t.re_ls_leaf.median),
                f"{secs(med([w.wall for w in a]))} ({med([w.wall for w in a]) / base:.2f}x)",
                f"{med([w.loads['registry'] for w in a]):.0f} / {med([w.loads['index'] for w in a]):.0f}",
            ])
        table = c.table(
            ["mount", "`butlerfs mount`", "first `ls` of a leaf", "`find`, first mount (x baseline)",
             "daemon CPU", "daemon RSS after (growth per dataset); once the kernel forgot its entries",
             "listings per dataset",
             "remount", "first `ls` of a leaf, remount", "`find`, remount (x baseline)",
             "loads registry / index, remount"],
            rows)
        bounded, again, limit = r["bounded"], r["bounded_again"], r["limit"]
        limit_text = "(The walk under a memory limit was skipped.)"
        if isinstance(bounded, Walk) and isinstance(again, Walk) and isinstance(limit, int):
            limit_text = (
                f"With `--mtime listed --memory-limit {limit >> 20}M` (a quarter of what the listings "
                f"need), a first `find` took {secs(bounded.wall)} and left "
                f"{bounded.listing_bytes / 2**20:.1f} MiB of listings (RSS {bounded.rss / 2**20:.0f} MiB, "
                f"{bounded.stats.get('evictions', 0)} pieces evicted); a second `find` on the same daemon "
                f"took {secs(again.wall)}, reloading {again.loads['index']:.0f} pieces from the index and "
                f"{again.loads['registry']:.0f} from the registry."
            )
        extra = ""
        requests = r["requests"]
        assert isinstance(requests, dict)
        for tag, counts in requests.items():
            total = sum(counts.values())
            extra += (f"\n\nFUSE requests of a first `find`, {tag} "
                      f"(`perf record -e fuse:fuse_request_send`): "
                      f"{total:,} in all, {total / n:.2f} per dataset: "
                      + ", ".join(f"{op} {k:,}" for op, k in counts.items()) + ".")
        profiles = r["profiles"]
        assert isinstance(profiles, dict)
        for tag, text in profiles.items():
            extra += (f"\n\nWhere the daemon's time went during the first `find`, {tag} (`py-spy record` at "
                      f"100 Hz):\n\n{text}")
        refresh = r["refresh"]
        assert isinstance(refresh, dict)
        if refresh:
            first, expired = refresh["first"], refresh["expired"]
            checks = int(expired.stats.get("state_checks", 0)) - int(first.stats.get("state_checks", 0))
            extra += (f"\n\nOne detector's subtree ({n // DETECTORS:,} datasets) with "
                      f"`--refresh {STALE_REFRESH:.0f}`: "
                      f"first walk {secs(first.wall)} ({first.loads['registry']:.0f} registry loads); "
                      f"again once the interval expired {secs(expired.wall)} "
                      f"({expired.loads['registry']:.0f} registry loads, {checks} "
                      "state checks: unchanged collections are not listed again).")
        sections.append(
            f"### {kind}, {n:,} datasets\n\nRepository {builds[(kind, n)]}. Baseline `butler query-datasets "
            f"... --limit 0`: {secs(base)} (best {secs(baseline.min)}, {len(baseline)} runs).\n\n{table}\n\n"
            f"{limit_text}{extra}"
        )
        d = trials.get("defaults") or next(iter(trials.values()))
        best_tag = min(trials, key=lambda k: med([w.wall for w in trials[k].first]))
        best = trials[best_tag]
        verdicts.append([
            f"{kind} {n:,}",
            f"{mwall(d.first) / base:.2f}x; {best_tag}: {mwall(best.first) / base:.2f}x",
            f"{secs(max(t.ls_leaf.max for t in trials.values()))}",
            f"{med([w.rss_growth for w in d.first]) / n:.0f} B "
            f"(listings {med([w.listing_bytes for w in d.first]) / n:.0f} B)",
            f"{secs(max(max(t.startup.values) for t in trials.values()))}",
            f"{med([w.loads['registry'] for w in d.again]):.0f} listing queries, "
            f"{secs(med([w.wall for w in d.again]))} ({med([w.wall for w in d.again]) / base:.2f}x)",
        ])
    targets = c.table(
        ["repository", "`find` / baseline (target <= 2, moonshot 1)", "first `ls` of a leaf, worst (< 0.5 s)",
         "daemon memory growth per dataset, defaults (<= 300 B)", "`butlerfs mount`, worst (< 2 s)",
         "remount walk: registry listing queries, `find`"],
        verdicts)
    command = "`.venv/bin/python scripts/bench/bench_tree.py" + (
        f" {shlex.join(sys.argv[1:])}`" if sys.argv[1:] else "`")
    return f"""
## Walking the whole tree at scale (`bench_tree.py`)

*{c.today()}{' — quick smoke run, not a result' if args.quick else ''}*

**Question.** How long does `find` take to list and stat every file of a mount of 10^5 and 10^6
datasets, compared with listing them with `butler query-datasets`, on SQLite and PostgreSQL
registries? Targets (issue 13): `find` <= 2x the baseline (moonshot 1x); first `ls` of any
directory < 0.5 s; daemon memory <= 300 bytes per listed dataset and bounded by a configurable
limit; `butlerfs mount` < 2 s at any size; a remount walkable with no registry listing query
for unchanged collections.

**Command.** {command} (run as root). Each repository holds one RUN of `{DATASET_TYPE}` datasets
(instrument, visit, detector; N/100 visits x {DETECTORS} detectors), small files ingested in
place; the mount shows `{DATASET_TYPE}/instrument_{INSTRUMENT}/detector_D/visit_V/FILE` (flat
layout: `.../detector_D/FILE`). Baseline: `butler query-datasets REPO {DATASET_TYPE} --collections
{RUN} --find-first --limit 0 > /dev/null`. Walk: `{shlex.join(find_command('MNT'))}`, its output
counted. Every mount runs with the default `--subtree-limit` and `--refresh`, `--log-level DEBUG`
(whose "Loaded" lines count the loads) and its own `--cache-dir` (the listing index lives there):
the "first mount" rows start from an empty index, each on a fresh daemon after `drop_caches`; the
"remount" rows are new daemons that find the index the first walk wrote. "Daemon RSS after"
is the daemon's resident memory after the walk, "growth per dataset" its growth since the mount
returned divided by the datasets, then the RSS after `echo 2 > /proc/sys/vm/drop_caches` (the
kernel forgets its cached entries, libfuse frees the node it keeps for each); "listings per
dataset" is what the daemon's listings hold
(`user.butlerfs.stats`), the part `--memory-limit` bounds. The first `ls` of a leaf is the first
command on a fresh mount. Repetitions: 3 below 10^6 datasets, 1 from 10^6; medians.

**Machine.**
{chr(10).join(facts)}
{c.load_line(load_at_start)}

**Targets.**

{targets}

{chr(10).join(sections)}

**Conclusion.** See the targets table; a miss is a miss.{c.contention_note(load_at_start)} Total
benchmark time {time.perf_counter() - started:.0f} s.
"""


if __name__ == "__main__":
    sys.exit(main())
