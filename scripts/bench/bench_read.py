"""Sequential read of one large artifact through a butlerfs mount vs the same file at rest.

Builds a repository holding one dataset whose artifact is a file of random bytes
(``--size-mib``, default 512 MiB), ingested with butlerfs's own formatter, under
``/var/tmp/butlerfs-bench`` (a disk, not tmpfs). Then, with ``dd if=FILE of=/dev/null
bs=1M`` timed from outside (the whole command):

* cold: ``echo 3 > /proc/sys/vm/drop_caches`` before each read, native file then
  the same file through the mount, interleaved;
* warm: the file already in the page cache (one untimed read first);
* the mount's ``read_ahead_kb`` (128 to 16384) and a single-threaded daemon, cold.

Writes the ``bench:read`` section of ``docs/BENCHMARKS.md``. Needs root (drop_caches,
sysfs). ``--quick`` is a smoke run: 64 MiB, one repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import _common as c
import psutil

SECTION = "read"
RUN = "bench/read"
INSTRUMENT = c.INSTRUMENT
DATASET_TYPE = "blob"
READ_AHEADS = (128, 1024, 4096, 16384)


def build_repo(root: Path, size_mib: int) -> Path:
    """Create a repository at ``root`` with one ``size_mib`` MiB artifact; return its path."""
    from lsst.daf.butler import DataCoordinate, DatasetIdGenEnum, DatasetRef, DatasetType, FileDataset

    from butlerfs.formatter import FileArtifactFormatter

    c.remove_tree(root)
    root.mkdir(parents=True)
    butler = c.new_repo(root / "repo")
    dataset_type = DatasetType(DATASET_TYPE, ("instrument",), "ButlerfsFile", universe=butler.dimensions)
    butler.registry.registerDatasetType(dataset_type)
    butler.registry.registerRun(RUN)
    staged = root / "staged.fits"
    with open(staged, "wb") as stream:
        c.write_random(stream, size_mib)
    data_id = DataCoordinate.standardize(instrument=INSTRUMENT, universe=butler.dimensions)
    ref = DatasetRef(dataset_type, data_id, run=RUN, id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN)
    butler.ingest(FileDataset(path=str(staged), refs=[ref], formatter=FileArtifactFormatter), transfer="move")
    native = Path(butler.getURI(ref).ospath)
    butler.close()
    if native.stat().st_size != size_mib * c.MIB:
        raise RuntimeError(f"ingested artifact {native} has the wrong size")
    return native


def dd_command(path: str) -> list[str]:
    return ["dd", f"if={path}", "of=/dev/null", "bs=1M"]


def dd_seconds(path: str) -> float:
    """Read ``path`` with ``dd bs=1M`` and return the wall time of the whole command."""
    elapsed, _ = c.run(dd_command(path))
    return elapsed


def mount_file(mountpoint: str) -> str:
    """The dataset's path in the mount (found by walking it: the layout decides the name)."""
    for parent, _, files in os.walk(Path(mountpoint, DATASET_TYPE)):
        for name in files:
            return os.path.join(parent, name)
    raise RuntimeError(f"no file under {mountpoint}/{DATASET_TYPE}")


@contextlib.contextmanager
def mounted(repo: str, mountpoint: Path, **kwargs: object) -> Iterator[tuple[str, psutil.Process]]:
    """Mount, yield the file's path in the mount and the daemon, unmount on exit."""
    import butlerfs

    c.fresh_dir(mountpoint)
    with butlerfs.mount(repo, str(mountpoint), collections=[RUN], **kwargs) as m:
        yield mount_file(m.mountpoint), psutil.Process(m.pid)


class CpuMeter:
    """CPU seconds (user + system) a process used between two calls."""

    def __init__(self, process: psutil.Process) -> None:
        self.process = process

    def now(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system


def cold_reads(path: str, reps: int, daemon: psutil.Process | None = None) -> tuple[c.Sample, c.Sample]:
    """Time ``reps`` cold reads of ``path``; also the daemon's CPU seconds per read."""
    wall, cpu = c.Sample(), c.Sample()
    meter = CpuMeter(daemon) if daemon else None
    for _ in range(reps):
        c.drop_caches()
        before = meter.now() if meter else 0.0
        wall.add(dd_seconds(path))
        cpu.add(meter.now() - before if meter else 0.0)
    return wall, cpu


def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=None,
                        help="artifact size in MiB (default 512; 64 with --quick)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, one repetition")
    parser.add_argument("--keep", action="store_true", help="keep the repository (default: delete it)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the machine's load average to fall below 1")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    size_mib = args.size_mib or (64 if args.quick else 512)
    reps = args.reps or (1 if args.quick else 5)
    c.require_root_for_cold()
    c.wait_for_quiet(args.wait_idle)
    # Machine facts and the code measured are taken now: the tree may change during a long run.
    facts, load_at_start = c.machine_facts(c.BENCH_DIR), c.load_average()

    root = c.BENCH_DIR / f"read-{size_mib}MiB"
    mountpoint = c.BENCH_DIR / "mnt-read"
    started = time.perf_counter()
    print(f"Building a repository with one {size_mib} MiB artifact under {root} ...", flush=True)
    try:
        native = str(build_repo(root, size_mib))
        repo = str(root / "repo")
        size = size_mib * c.MIB
        results: dict[str, tuple[c.Sample, c.Sample]] = {}

        with mounted(repo, mountpoint) as (through, daemon):
            ra_default = c.get_read_ahead(str(mountpoint))
            c.run(["cmp", native, through])  # the bytes are the same
            print(f"Cold reads, {reps} x (native, mount), read_ahead_kb={ra_default} ...", flush=True)
            cold_native, cold_mount, cold_cpu = c.Sample(), c.Sample(), c.Sample()
            meter = CpuMeter(daemon)
            for _ in range(reps):
                c.drop_caches()
                cold_native.add(dd_seconds(native))
                c.drop_caches()
                before = meter.now()
                cold_mount.add(dd_seconds(through))
                cold_cpu.add(meter.now() - before)
            print("Warm reads ...", flush=True)
            dd_seconds(native)
            dd_seconds(through)
            warm_native, warm_mount, warm_cpu = c.Sample(), c.Sample(), c.Sample()
            for _ in range(reps):
                warm_native.add(dd_seconds(native))
                before = meter.now()
                warm_mount.add(dd_seconds(through))
                warm_cpu.add(meter.now() - before)
            for kb in READ_AHEADS:
                print(f"Cold reads with read_ahead_kb={kb} ...", flush=True)
                c.set_read_ahead(str(mountpoint), kb)
                results[f"ra{kb}"] = cold_reads(through, reps, daemon)
            c.set_read_ahead(str(mountpoint), ra_default)

        print("Cold reads with a single-threaded daemon ...", flush=True)
        with mounted(repo, mountpoint, threads=False) as (through, daemon):
            results["single"] = cold_reads(through, reps, daemon)
    finally:
        if not args.keep:
            c.remove_tree(root)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()

    def row(label: str, native_s: c.Sample, mount_s: c.Sample, cpu: c.Sample) -> list[str]:
        return [
            label,
            f"{mbps(size, native_s.median):.0f} ({mbps(size, native_s.min):.0f})",
            f"{mbps(size, mount_s.median):.0f} ({mbps(size, mount_s.min):.0f})",
            c.ratio(native_s.median / mount_s.median),
            c.ratio(native_s.min / mount_s.min),
            f"{cpu.median:.2f} s",
        ]

    main_table = c.table(
        ["cache", "native MB/s median (best)", "mount MB/s median (best)", "ratio mount/native (medians)",
         "ratio (bests)", "daemon CPU per read"],
        [row("cold", cold_native, cold_mount, cold_cpu), row("warm", warm_native, warm_mount, warm_cpu)],
    )
    variant_rows = []
    for kb in READ_AHEADS:
        wall, cpu = results[f"ra{kb}"]
        label = f"multi-threaded, read_ahead_kb={kb}"
        if kb == ra_default:
            label += " (the daemon's default)"
        variant_rows.append([label, f"{mbps(size, wall.median):.0f} ({mbps(size, wall.min):.0f})",
                             c.ratio(cold_native.median / wall.median), c.ratio(cold_native.min / wall.min),
                             f"{cpu.median:.2f} s"])
    wall, cpu = results["single"]
    variant_rows.append([f"single-threaded (`threads=False`), read_ahead_kb={ra_default}",
                         f"{mbps(size, wall.median):.0f} ({mbps(size, wall.min):.0f})",
                         c.ratio(cold_native.median / wall.median), c.ratio(cold_native.min / wall.min),
                         f"{cpu.median:.2f} s"])
    variant_table = c.table(
        ["daemon", "cold mount MB/s median (best)", "ratio to native cold (medians)", "ratio (bests)",
         "daemon CPU per read"],
        variant_rows,
    )
    cold_ratio = cold_native.median / cold_mount.median
    warm_ratio = warm_native.median / warm_mount.median
    verdict = (
        f"Cold ratio {cold_ratio:.2f} ({'meets' if cold_ratio >= 0.8 else 'misses'} the target 0.8; "
        f"{cold_native.min / cold_mount.min:.2f} best against best); "
        f"warm ratio {warm_ratio:.2f} ({'meets' if warm_ratio >= 0.9 else 'misses'} the target 0.9; "
        f"{warm_native.min / warm_mount.min:.2f} best against best)."
    )
    best = max(READ_AHEADS, key=lambda kb: mbps(size, results[f"ra{kb}"][0].median))
    command = "`.venv/bin/python scripts/bench/bench_read.py" + (f" {shlex.join(sys.argv[1:])}`"
                                                                 if sys.argv[1:] else "`")
    native_dev_ra = "unknown"
    with contextlib.suppress(OSError):
        dev = os.stat(c.BENCH_DIR).st_dev
        sysfs = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/read_ahead_kb"
        native_dev_ra = Path(sysfs).read_text()
    caution = c.contention_note(load_at_start)
    body = f"""
## Sequential read of one large artifact (`bench_read.py`)

*{c.today()}{' — quick smoke run, not a result' if args.quick else ''}*

**Question.** How fast does `dd` read one {size_mib} MiB artifact through the mount, compared
with the same file at rest in the datastore, with a cold and a warm page cache? Targets:
mount/native >= 0.8 cold, >= 0.9 warm.

**Command.** {command} (run as root). Each read is `{shlex.join(dd_command('FILE'))}`, timed as a
whole command from outside; MB/s is 10^6 bytes per second of wall time. Cold: `sync; echo 3 >
/proc/sys/vm/drop_caches` before every read, native and mount reads interleaved. Warm: after one
untimed read of each. {reps} repetitions each; median, best in parentheses. The artifact is random
bytes ingested with `transfer="move"` through `butlerfs.formatter.FileArtifactFormatter`; the
mount is `butlerfs.mount()` with default options (multi-threaded, kernel read-ahead raised to
{ra_default} KiB by the daemon). "daemon CPU" is the daemon's user+system CPU time during one read.

**Machine.**
{chr(10).join(facts)}
{c.load_line(load_at_start)}
- Block device read_ahead_kb of the native file's disk: {native_dev_ra.strip()}

{main_table}

Effect of the mount's read-ahead (`/sys/class/bdi/0:N/read_ahead_kb`, written after mounting)
and of a single-threaded daemon, cold cache:

{variant_table}

**Conclusion.** {verdict} Among the read-ahead values tried, {best} KiB read fastest cold.{caution}
Total benchmark time {time.perf_counter() - started:.0f} s.
"""
    c.publish(SECTION, body, args.no_docs)
    print(main_table)
    print(variant_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
