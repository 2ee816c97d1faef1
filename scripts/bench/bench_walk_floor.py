"""Walk trees of ``bench_tree.py``'s shape through other FUSE filesystems: what any FUSE walk costs.

Issue 13 asks for ``find`` over a whole mount in at most 2x ``butler query-datasets``. In the
default layout each dataset sits in its own ``visit_*`` directory, so ``find`` opens, reads
and closes one directory per dataset. This benchmark asks how fast that walk can be through
FUSE at all, whatever serves it. It writes plain directory trees with the names a butlerfs
mount of ``bench_tree.py``'s repository of N datasets shows (the default layout, and the flat
one, files directly in the ``detector_*`` directories; every file 2,889 bytes, as there) and
times ``find DIR -type f -printf '%s %T@\\n'`` over each:

* on the local disk, with its dentries cached and after ``drop_caches``;
* through ``squashfuse_ll`` (C, libfuse 3's low-level API) from a squashfs image of the tree;
* through ``bindfs -r`` (C, libfuse 3's high-level API, the one butlerfs uses via mfusepy);
* through ``rclone mount`` (Go, its own FUSE library) of the tree as a local remote;
* through ``butlerfs mount`` of the repository itself (``bench_tree.py`` builds and caches it):
  a first mount (registry queries) and a remount (its on-disk listing index, no query);

and the baseline, ``butler query-datasets REPO calexp --collections bench/tree --find-first
--limit 0``, timed as ``bench_tree.py`` does (after a first run, the registry in the page
cache). Every FUSE walk is on a new mount after ``drop_caches``; the serving process's CPU
time is read when the walk ends. Writes the ``bench:walkfloor`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import _common as c
import bench_tree as tree
import psutil

SECTION = "walkfloor"
PEER_NAMES = (
    "squashfuse_ll (C, low-level libfuse)",
    "bindfs -r (C, high-level libfuse)",
    "rclone mount (Go)",
)
BUTLERFS_FIRST, BUTLERFS_REMOUNT = "butlerfs, first mount", "butlerfs, remount (listing index)"
LAYOUTS = ("default", "flat")
Rows = dict[str, list[tuple[float, float]]]
FILE_SIZE = 2889  # bytes: a bench_tree dataset's file


def build_tree(root: Path, n: int, layout: str) -> Path:
    """Write (once) a tree with the names a butlerfs mount of ``n`` bench_tree datasets shows."""
    top = root / f"{layout}-{n}"
    done = top / ".built"
    if done.exists():
        return top / "tree"
    c.remove_tree(top)
    base = top / "tree" / tree.DATASET_TYPE / f"instrument_{tree.INSTRUMENT}"
    for detector in range(tree.DETECTORS):
        parent = base / f"detector_{detector}"
        for visit in tree.visits_for(n):
            directory = parent if layout == "flat" else parent / f"visit_{visit}"
            directory.mkdir(parents=True, exist_ok=True)
            name = directory / f"{tree.DATASET_TYPE}_{tree.INSTRUMENT}_{detector}_{visit}.fits"
            with open(name, "wb") as stream:
                stream.truncate(FILE_SIZE)
    c.run(["mksquashfs", str(top / "tree"), str(top / "tree.sqfs"), "-quiet", "-no-progress"])
    done.touch()
    return top / "tree"


def timed_find(path: Path, expect: int) -> float:
    elapsed, count = tree.count_lines_of(tree.find_command(str(path)))
    if count != expect:
        raise RuntimeError(f"find {path} listed {count} files, expected {expect}")
    return elapsed


@contextlib.contextmanager
def served(cmd: list[str], mountpoint: Path, log: Path) -> Iterator[psutil.Process]:
    """Run a FUSE server in the foreground until it has mounted; unmount and stop it by PID."""
    with open(log, "ab") as stream:
        proc = subprocess.Popen(cmd, stdout=stream, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} did not mount {mountpoint}: see {log}")
            time.sleep(0.05)
        yield psutil.Process(proc.pid)
    finally:
        subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_of(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def peers(top: Path, layout_tree: Path) -> dict[str, list[str]]:
    """The FUSE servers of a plain tree, as commands taking the mount point last."""
    image = layout_tree.parent / "tree.sqfs"
    commands = (
        [c.find_tool("squashfuse_ll"), "-f", str(image)],
        [c.find_tool("bindfs"), "-f", "-r", str(layout_tree)],
        [c.find_tool("rclone"), "mount", str(layout_tree), "--read-only",
         "--config", str(top / "rclone.conf")],
    )
    return dict(zip(PEER_NAMES, commands, strict=True))


def measure(n: int, reps: int, work: Path, repo: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """Median find seconds and server CPU seconds per layout and filesystem."""
    expect = n
    results: dict[str, dict[str, tuple[float, float]]] = {}
    mountpoint = work / "mnt"
    for layout in LAYOUTS:
        plain = build_tree(work, n, layout)
        rows: Rows = {}

        def add(name: str, wall: float, cpu: float, rows: Rows = rows, layout: str = layout) -> None:
            rows.setdefault(name, []).append((wall, cpu))
            print(f"  {layout:8} {name:40} find {wall:7.2f} s  server CPU {cpu:6.2f} s", flush=True)

        for _ in range(reps):
            c.drop_caches()
            add("local disk, after drop_caches", timed_find(plain, expect), 0.0)
            add("local disk, dentries cached", timed_find(plain, expect), 0.0)
            for name, cmd in peers(work, plain).items():
                c.fresh_dir(mountpoint)
                with served([*cmd, str(mountpoint)], mountpoint, work / "peers.log") as server:
                    c.drop_caches()
                    wall = timed_find(mountpoint, expect)
                    add(name, wall, cpu_of(server))
            options = ["--layout", "flat"] if layout == "flat" else []
            cache = work / "cache"
            c.remove_tree(cache)
            cache.mkdir()
            for name in (BUTLERFS_FIRST, BUTLERFS_REMOUNT):
                with tree.mounted(repo, mountpoint, options, work / "butlerfs.log", cache) as m:
                    c.drop_caches()
                    cpu_before = m.cpu()
                    wall = timed_find(Path(m.mountpoint), expect)
                    add(name, wall, m.cpu() - cpu_before)
        results[layout] = {
            name: (c.Sample([w for w, _ in got]).median, c.Sample([u for _, u in got]).median)
            for name, got in rows.items()
        }
    return results


def report(n: int, reps: int, baseline: c.Sample, results: dict[str, dict[str, tuple[float, float]]],
           facts: list[str], load_at_start: str, started: float) -> str:
    base = baseline.median
    dirs = {"default": n, "flat": tree.DETECTORS}
    parts = [
        f"## What any FUSE filesystem takes to walk the same tree (`bench_walk_floor.py`)\n\n"
        f"*{c.today()}*\n",
        "**Question.** Issue 13 asks for `find` over a whole mount in at most 2x `butler "
        "query-datasets`. In the default layout every dataset has its own directory. How fast "
        "can any FUSE filesystem walk a tree of that shape on this machine, and how far is "
        "butlerfs from it?\n",
        f"**Command.** `.venv/bin/python scripts/bench/bench_walk_floor.py --datasets {n} --reps "
        f"{reps}` (as root: it drops the page cache). It writes plain trees with the names a "
        "butlerfs mount of `bench_tree.py`'s repository shows (`calexp/instrument_BenchCam/"
        "detector_D/visit_V/calexp_BenchCam_D_V.fits`; flat: no `visit_V` directory), "
        f"{tree.DETECTORS} detectors, files of {FILE_SIZE} bytes, and times `find DIR -type f "
        "-printf '%s %T@\\n'` (its lines counted) on the local disk and through "
        "`squashfuse_ll` (C, libfuse 3's low-level API, from a squashfs image), `bindfs -r` (C, "
        "libfuse 3's high-level API, as butlerfs through mfusepy) and `rclone mount` (Go, its "
        "own FUSE library, the tree as a local remote), each a new mount after `drop_caches`. "
        "butlerfs mounts the repository itself (SQLite registry; defaults, or `--layout flat`): "
        "a first mount that queries the registry, and a remount that reads its listing index. "
        "Baseline: `butler query-datasets REPO calexp --collections bench/tree --find-first "
        "--limit 0`, after a first run (the registry in the page cache, as in `bench_tree.py`; "
        "the walks start with the page cache dropped). Server CPU: the FUSE process's user and "
        "system time during the walk. "
        f"{reps} repetition(s); medians.\n",
        "**Machine.**\n" + "\n".join(facts) + "\n" + c.load_line(load_at_start) + "\n",
        f"**{n:,} datasets**, baseline `butler query-datasets` {c.seconds(base)}:\n",
    ]
    for layout in LAYOUTS:
        rows = []
        for name, (wall, cpu) in results[layout].items():
            rows.append([name, c.seconds(wall), f"{wall / base:.2f}x", c.seconds(cpu) if cpu else "-",
                         f"{wall / n * 1e6:.0f} µs"])
        parts.append(f"Layout **{layout}** ({dirs[layout]:,} directories of files):\n\n" + c.table(
            ["walk through", "`find`", "/ baseline", "server CPU", "per dataset"], rows) + "\n")
    sentences = []
    for layout in LAYOUTS:
        got = results[layout]
        wall, name = min((wall, name) for name, (wall, _) in got.items() if name in PEER_NAMES)
        first, again = got[BUTLERFS_FIRST][0], got[BUTLERFS_REMOUNT][0]
        verdict = "within" if wall <= 2 * base else "beyond"
        sentences.append(
            f"In the {layout} layout the fastest other FUSE filesystem, {name}, walks the tree in "
            f"{c.seconds(wall)}, {wall / base:.2f}x the baseline: the 2x target is {verdict} what "
            f"a FUSE walk of that shape costs here. butlerfs takes {first / base:.2f}x on a first "
            f"mount and {again / base:.2f}x on a remount ({first / wall:.2f}x and {again / wall:.2f}x "
            "that filesystem's time)."
        )
    parts.append(
        "**Conclusion.** " + " ".join(sentences) + "\n"
        f"Total benchmark time {time.monotonic() - started:.0f} s."
        + c.contention_note(load_at_start)
    )
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=int, default=100_000, help="datasets (a multiple of 100)")
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="wait up to this long for the load average to fall below 1 first")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    c.require_root_for_cold()
    for tool in ("mksquashfs", "squashfuse_ll", "bindfs", "rclone", "fusermount3"):
        c.find_tool(tool)
    started = time.monotonic()
    repo, _, _ = tree.ensure_repo(args.datasets, rebuild=False)
    work = c.BENCH_DIR / "walk-floor"
    work.mkdir(parents=True, exist_ok=True)
    (work / "rclone.conf").touch()
    c.wait_for_quiet(args.wait_idle)
    load_at_start = c.load_average()
    facts = c.machine_facts(work)
    baseline = c.Sample()
    tree.query_datasets(repo)  # the registry in the page cache, as bench_tree.py times it
    for _ in range(args.reps):
        baseline.add(tree.query_datasets(repo))
        print(f"  baseline butler query-datasets {baseline.values[-1]:.2f} s", flush=True)
    results = measure(args.datasets, args.reps, work, repo)
    c.publish(SECTION, report(args.datasets, args.reps, baseline, results, facts, load_at_start, started),
              args.no_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
