"""Walk and stat a whole mount of 100,000 datasets vs listing them with ``butler query-datasets``.

Builds (once, cached under ``/var/tmp/butlerfs-bench/tree-N``) a repository with N
datasets of one dataset type ``calexp`` (dimensions instrument, visit, detector:
N/100 visits x 100 detectors), each a small file, ingested in place in batches.
Then measures, as whole commands timed from outside:

* baseline: ``butler query-datasets REPO calexp --collections RUN --find-first --limit 0``
  (stdout to /dev/null), and the same with ``--show-uri``;
* ``butlerfs mount`` (invocation to return), the first ``ls`` of the top level, the
  first ``ls`` of one leaf directory deep in the tree (each on a fresh mount);
* ``find MNT -type f -printf '%s %T@\\n'`` (a stat of every file) on a fresh mount,
  again after dropping the kernel's caches (the daemon keeps its tree), and again
  with everything cached;
* re-walking one detector's subtree after the listings' ``refresh`` interval expired;

for the default ``subtree_limit`` and a larger one. Writes the ``bench:tree`` section of
``docs/BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import _common as c
import psutil

SECTION = "tree"
RUN = "bench/tree"
INSTRUMENT = c.INSTRUMENT
DATASET_TYPE = "calexp"
DETECTORS = 100
BATCH = 20_000
DEFAULT_SUBTREE_LIMIT = 20_000
STALE_REFRESH = 5.0  # seconds: the refresh interval of the "after refresh expired" measurement
LOADED = re.compile(r"Loaded .*: (\d+) (\w+)(?: values)? in ([0-9.]+) s$")


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


def ensure_repo(n: int, rebuild: bool, registry: str | None = None) -> tuple[Path, dict[str, float] | None, str]:
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

    def __init__(self, repo: Path, mountpoint: Path, subtree_limit: int, refresh: float, log: Path,
                 threads: bool = True) -> None:
        self.mountpoint = str(c.fresh_dir(mountpoint))
        self.log = log
        self.log_offset = log.stat().st_size if log.exists() else 0
        cmd = [c.find_tool("butlerfs"), "mount", str(repo), self.mountpoint, "-c", RUN,
               "--subtree-limit", str(subtree_limit), "--refresh", str(refresh),
               "--log-level", "DEBUG", "--log-file", str(log), *([] if threads else ["--single-thread"])]
        self.startup, result = c.run(cmd, stdout=subprocess.PIPE)
        match = re.search(rb"daemon (\d+)", result.stdout)
        self.daemon = psutil.Process(int(match.group(1))) if match else None

    def cpu(self) -> float:
        if self.daemon is None:
            return float("nan")
        times = self.daemon.cpu_times()
        return times.user + times.system

    def loads(self) -> tuple[int, float]:
        """Directory loads logged since the last call, and their total seconds."""
        count, total = 0, 0.0
        with open(self.log) as stream:
            stream.seek(self.log_offset)
            for line in stream:
                match = LOADED.search(line.rstrip())
                if match:
                    count += 1
                    total += float(match.group(3))
            self.log_offset = stream.tell()
        return count, total

    def unmount(self) -> None:
        c.run([c.find_tool("butlerfs"), "umount", self.mountpoint])


@contextlib.contextmanager
def mounted(repo: Path, mountpoint: Path, subtree_limit: int, log: Path,
            refresh: float = 3600.0, threads: bool = True) -> Iterator[Mounted]:
    m = Mounted(repo, mountpoint, subtree_limit, refresh, log, threads)
    try:
        yield m
    finally:
        m.unmount()


class Find:
    """Timed walks of a mount, with the daemon's CPU time and registry loads during each."""

    def __init__(self) -> None:
        self.wall, self.cpu, self.loads, self.load_s = c.Sample(), c.Sample(), c.Sample(), c.Sample()

    def measure(self, m: Mounted, path: str | list[str], expect: int) -> float:
        cpu = m.cpu()
        m.loads()
        elapsed, count = count_lines_of(find_command(path))
        if count != expect:
            raise RuntimeError(f"find listed {count} files, expected {expect}")
        loads, load_s = m.loads()
        self.wall.add(elapsed)
        self.cpu.add(m.cpu() - cpu)
        self.loads.add(loads)
        self.load_s.add(load_s)
        return elapsed


def leaf_dir(mountpoint: str, n: int) -> str:
    """A directory holding one file, deep in the tree (the middle detector, a late visit)."""
    visit = visits_for(n)[-1]
    return os.path.join(mountpoint, DATASET_TYPE, f"instrument_{INSTRUMENT}", f"detector_{DETECTORS // 2}",
                        f"visit_{visit}")


def detector_dir(mountpoint: str, detector: int) -> str:
    return os.path.join(mountpoint, DATASET_TYPE, f"instrument_{INSTRUMENT}", f"detector_{detector}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=None, help="number of datasets (default 100000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 5000 datasets, one repetition")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached repository")
    parser.add_argument("--subtree-limits", default=f"{DEFAULT_SUBTREE_LIMIT},200000",
                        help="comma-separated subtree_limit values to compare (default: %(default)s)")
    parser.add_argument("--no-single-thread", action="store_true",
                        help="skip the single-threaded daemon variant")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the machine's load average to fall below 1")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    n = args.datasets or (5_000 if args.quick else 100_000)
    reps = args.reps or (1 if args.quick else 3)
    limits = [int(x) for x in args.subtree_limits.split(",")]
    c.require_root_for_cold()
    c.wait_for_quiet(args.wait_idle)
    # Machine facts and the code measured are taken now: the tree may change during a long run.
    facts, load_at_start = c.machine_facts(c.BENCH_DIR), c.load_average()
    started = time.perf_counter()

    repo, steps, built = ensure_repo(n, args.rebuild)
    mountpoint = c.BENCH_DIR / "mnt-tree"
    log = c.BENCH_DIR / f"tree-{n}" / "daemon.log"
    with contextlib.suppress(FileNotFoundError):
        log.unlink()

    print(f"Baseline: butler query-datasets, {reps} repetitions ...", flush=True)
    query_datasets(repo)  # warm the registry file into the page cache, as the mounts will find it
    baseline, baseline_uri = c.Sample(), c.Sample()
    for _ in range(reps):
        baseline.add(query_datasets(repo))
        baseline_uri.add(query_datasets(repo, "--show-uri"))
    print(f"  {baseline.median:.2f} s, with --show-uri {baseline_uri.median:.2f} s", flush=True)

    variants = [(f"subtree_limit={lim}" + (" (default)" if lim == DEFAULT_SUBTREE_LIMIT else ""), lim, True)
                for lim in limits]
    if not args.no_single_thread:
        tag = f"subtree_limit={DEFAULT_SUBTREE_LIMIT}, `--single-thread`"
        variants.append((tag, DEFAULT_SUBTREE_LIMIT, False))
    per_limit: dict[str, dict[str, object]] = {}
    requests: dict[str, int] = {}
    try:
        for tag, limit, threads in variants:
            print(f"{tag}: {reps} x (mount, ls top, ls leaf; mount, find x3) ...", flush=True)
            startup, ls_top, ls_leaf = c.Sample(), c.Sample(), c.Sample()
            fresh, kernel_cold, warm = Find(), Find(), Find()
            for _ in range(reps):
                with mounted(repo, mountpoint, limit, log, threads=threads) as m:
                    startup.add(m.startup)
                    ls_top.add(c.run(["ls", m.mountpoint])[0])
                    ls_leaf.add(c.run(["ls", leaf_dir(m.mountpoint, n)])[0])
                c.drop_caches()
                with mounted(repo, mountpoint, limit, log, threads=threads) as m:
                    fresh.measure(m, m.mountpoint, n)
                    c.drop_caches()
                    kernel_cold.measure(m, m.mountpoint, n)
                    warm.measure(m, m.mountpoint, n)
                print(f"  mount {startup.values[-1]:.2f} s, ls top {ls_top.values[-1] * 1e3:.0f} ms, "
                      f"ls leaf {ls_leaf.values[-1]:.3f} s, find {fresh.wall.values[-1]:.1f} / "
                      f"{kernel_cold.wall.values[-1]:.1f} / {warm.wall.values[-1]:.1f} s", flush=True)
            per_limit[tag] = dict(startup=startup, ls_top=ls_top, ls_leaf=ls_leaf, fresh=fresh,
                                  kernel_cold=kernel_cold, warm=warm)

        if c.can_trace_fuse():
            print("FUSE requests of one more first find (default mount, under perf) ...", flush=True)
            c.drop_caches()
            with mounted(repo, mountpoint, DEFAULT_SUBTREE_LIMIT, log) as m:
                _, requests = c.fuse_request_counts(m.mountpoint, find_command(m.mountpoint),
                                                    c.BENCH_DIR / f"tree-{n}")

        print(f"One detector's subtree, before and after a refresh interval of {STALE_REFRESH:.0f} s ...",
              flush=True)
        per_detector = n // DETECTORS
        first, expired, expired_leaves = Find(), Find(), Find()
        for i in range(reps):
            with mounted(repo, mountpoint, DEFAULT_SUBTREE_LIMIT, log, refresh=STALE_REFRESH) as m:
                path = detector_dir(m.mountpoint, i)
                first.measure(m, path, per_detector)
                time.sleep(STALE_REFRESH + 1.0)
                expired.measure(m, path, per_detector)
                leaves = sorted(os.path.join(path, name) for name in os.listdir(path))
                time.sleep(STALE_REFRESH + 1.0)
                expired_leaves.measure(m, leaves, per_detector)
    finally:
        with contextlib.suppress(OSError):
            mountpoint.rmdir()

    # -- the report -----------------------------------------------------------------------------
    base = baseline.median

    def cell(sample: c.Sample) -> str:
        return f"{c.seconds(sample.median)} ({c.seconds(sample.min)})"

    def find_row(label: str, find: Find, extra: float = 0.0, extra_label: str = "") -> list[str]:
        return [label + extra_label, cell(find.wall) if not extra else c.seconds(find.wall.median + extra),
                c.ratio((find.wall.median + extra) / base), c.ratio((find.wall.min + extra) / baseline.min),
                f"{find.cpu.median:.1f} s", f"{find.loads.median:.0f} / {find.load_s.median:.1f} s"]

    header = ["what", "wall median (best)", "ratio to query-datasets (medians)", "ratio (bests)",
              "daemon CPU", "registry loads / time"]
    main_rows: list[list[str]] = [
        ["`butler query-datasets ... --limit 0` (baseline)", cell(baseline), "1.00", "1.00", "", ""],
        ["`butler query-datasets ... --limit 0 --show-uri`", cell(baseline_uri),
         c.ratio(baseline_uri.median / base), c.ratio(baseline_uri.min / baseline.min), "", ""],
    ]
    side_rows: list[list[str]] = []
    for tag, r in per_limit.items():
        fresh_find, kc, warm_find = r["fresh"], r["kernel_cold"], r["warm"]
        startup = r["startup"]
        assert isinstance(fresh_find, Find) and isinstance(kc, Find) and isinstance(warm_find, Find)
        assert isinstance(startup, c.Sample)
        main_rows += [
            find_row(f"{tag}: find, fresh mount", fresh_find),
            find_row(f"{tag}: ", fresh_find, extra=startup.median, extra_label="`butlerfs mount` + find"),
            find_row(f"{tag}: find again, kernel caches dropped", kc),
            find_row(f"{tag}: find again, all cached", warm_find),
        ]
        ls_top, ls_leaf = r["ls_top"], r["ls_leaf"]
        assert isinstance(ls_top, c.Sample) and isinstance(ls_leaf, c.Sample)
        side_rows.append([tag, cell(startup), cell(ls_top), cell(ls_leaf)])

    main_table = c.table(header, main_rows)
    side_table = c.table(["mount", "`butlerfs mount` to return", "first `ls` of the top level",
                          "first `ls` of a leaf directory"], side_rows)
    stale_table = c.table(
        ["walk of one detector's subtree", "wall median (best)", "daemon CPU", "registry loads / time"],
        [[f"first, fresh mount ({per_detector} datasets)", cell(first.wall), f"{first.cpu.median:.2f} s",
          f"{first.loads.median:.0f} / {first.load_s.median:.2f} s"],
         [f"again after the refresh interval ({STALE_REFRESH:.0f} s) expired", cell(expired.wall),
          f"{expired.cpu.median:.2f} s", f"{expired.loads.median:.0f} / {expired.load_s.median:.2f} s"],
         [f"its {per_detector} leaf directories given to `find` by path, after the interval expired again",
          cell(expired_leaves.wall), f"{expired_leaves.cpu.median:.2f} s",
          f"{expired_leaves.loads.median:.0f} / {expired_leaves.load_s.median:.2f} s"]],
    )
    default = next(iter(per_limit.values()))
    default_find = default["fresh"]
    assert isinstance(default_find, Find)
    fresh_ratio = default_find.wall.median / base
    best_limit = min(per_limit, key=lambda tag: per_limit[tag]["fresh"].wall.median)  # type: ignore[union-attr]
    top_max = max(max(r["ls_top"].values) for r in per_limit.values())  # type: ignore[union-attr]
    verdict = (
        f"With the default subtree_limit a first `find` of the mount takes {fresh_ratio:.2f}x "
        f"`butler query-datasets` ({'meets' if fresh_ratio <= 1.5 else 'misses'} the target 1.5x; "
        f"{default_find.wall.min / baseline.min:.2f}x best against best); "
        f"the fastest first walk was with {best_limit}. The first `ls` of the top level "
        f"took at most {c.seconds(top_max)}. After the listings expired, re-walking a detector took "
        f"{expired.wall.median / first.wall.median:.1f}x its first walk with "
        f"{expired.loads.median:.0f} registry loads, and listing its leaf directories by path took "
        f"{expired_leaves.wall.median / first.wall.median:.1f}x with {expired_leaves.loads.median:.0f} loads."
    )
    if requests:
        total = sum(requests.values())
        requests_text = (
            "FUSE requests the kernel sent the daemon during one more first `find` on a fresh default "
            "mount (counted with `perf record -e fuse:fuse_request_send`, this mount's connection only): "
            f"{total:,} in all, {total / n:.1f} per dataset.\n\n"
            + c.table(["request", "count", "per dataset"],
                      [[op, f"{k:,}", f"{k / n:.2f}"] for op, k in requests.items()])
        )
    else:
        requests_text = "(FUSE request counts skipped: needs root and `perf` with the fuse tracepoints.)"
    build_note = ", ".join(f"{k} {v:.0f} s" for k, v in (steps or {}).items())
    command = "`.venv/bin/python scripts/bench/bench_tree.py" + (
        f" {shlex.join(sys.argv[1:])}`" if sys.argv[1:] else "`")
    caution = c.contention_note(load_at_start)
    body = f"""
## Walking the whole tree (`bench_tree.py`)

*{c.today()}{' — quick smoke run, not a result' if args.quick else ''}*

**Question.** How long does `find` take to list and stat every file of a mount of {n:,}
datasets, compared with listing the same datasets with `butler query-datasets`? Target: mount
<= 1.5x. Also: how long the mount takes to start, and the first `ls` of the top level (should be
well under a second) and of a leaf directory.

**Command.** {command} (run as root). The repository (built {built}: {build_note}) holds one
RUN with {n:,} datasets of `{DATASET_TYPE}` (instrument, visit, detector; {len(visits_for(n))} visits x
{DETECTORS} detectors), small files ingested in place; the mount shows them as
`{DATASET_TYPE}/instrument_{INSTRUMENT}/detector_D/visit_V/FILE`, one directory per dataset.
Baseline: `butler query-datasets REPO {DATASET_TYPE} --collections {RUN} --find-first --limit 0 >
/dev/null`. Walk: `{shlex.join(find_command('MNT'))}` (stats each file), output counted to check
all {n:,} files. Every measurement is the wall time of the whole command, timed from outside; the
registry file is in the page cache for all of them. Mounts use `butlerfs mount --refresh 3600`
(so no listing expires during the run) and `--log-level DEBUG`, whose per-directory "Loaded"
lines give the registry loads column. "Fresh mount" is a new daemon after `drop_caches`;
"kernel caches dropped" is the same daemon after `echo 3 > /proc/sys/vm/drop_caches` (the daemon
keeps its tree, the kernel forgets entries and attributes); "all cached" follows without dropping.
{reps} repetitions; median, best in parentheses.

**Machine.**
{chr(10).join(facts)}
{c.load_line(load_at_start)}

{main_table}

Start-up and first listings (each on a fresh mount; the leaf is
`{os.path.relpath(leaf_dir('/', n), '/')}`, listed after the top level):

{side_table}

{requests_text}

Listings expire after `--refresh` seconds. A walk of one detector's subtree on a fresh mount with
`--refresh {STALE_REFRESH:.0f}`; the same walk once that interval has passed; then, once it has
passed again, `find` given every leaf directory of that detector by path (as a script that
builds paths itself would reach them):

{stale_table}

**Conclusion.** {verdict}{caution} Total benchmark time {time.perf_counter() - started:.0f} s.
"""
    c.publish(SECTION, body, args.no_docs)
    print(main_table)
    print(side_table)
    print(stale_table)
    print(requests_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
