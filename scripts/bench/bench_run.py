"""``butlerfs run`` vs a plain shell loop running the same program on the same files.

Builds (once; cached under ``/var/tmp/butlerfs-bench/run-<N>/``, ``--rebuild`` to redo it) a
demo repository with N calexp data IDs (``make_demo_repo(visits=N/4, detectors=4,
image_size=64)``). The program, identical in every arm, reads the first FITS block of its
input and sleeps 0.2 s::

    sh -c 'head -c 2880 "$1" >/dev/null; sleep 0.2' _ FILE

Arms, interleaved within each repetition, each timed as a whole command from outside:

* **shell loop**: ``for f in $(cat LIST); do PROGRAM "$f"; done`` over the artifacts at rest
  (their paths from ``butler.getURI``, found once before timing);
* **xargs -P 2**: the same list through ``xargs -P 2 -n 1``;
* **butlerfs run -j 1** and **-j 2**: ``butlerfs run REPO -c LSSTCam-imSim/defaults -i
  calexp=calexp -w "instrument='LSSTCam-imSim'" --sandbox on -- PROGRAM {calexp}``, console
  only, a fresh ``--workdir`` each time.

The fixed cost of a ``butlerfs run`` (interpreter start, imports, planning and its Butler
queries, the overlay and sandbox probes, the butlerfs mount and its unmount) is separated
from the per-data-ID part with the manifests: the per-data-ID part is the span from the first
data ID's ``started`` to the last one's ``finished``; the rest of the command's wall time is
fixed. Then a smaller table runs ``-j 1`` with each overlay mode (kernel, fuse, links) with
the sandbox on and off, over the first ``min(N, 40)`` data IDs.

Writes the ``bench:run`` section of ``docs/BENCHMARKS.md``. ``--quick``: 20 data IDs, one
repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import _common as c

SECTION = "run"
COLLECTIONS = "LSSTCam-imSim/defaults"
INSTRUMENT = "LSSTCam-imSim"
DETECTORS = 4
IMAGE_SIZE = 64
SLEEP = 0.2
SCRIPT = f'head -c 2880 "$1" >/dev/null; sleep {SLEEP}'
PROGRAM = ["sh", "-c", SCRIPT, "_"]
"""The program, followed by the input's path in every arm."""
EXTRA_MAX = 40
"""Data IDs of the overlay/sandbox table."""


# -- the repository -------------------------------------------------------------------------------


def ensure_repo(n: int, rebuild: bool) -> tuple[Path, str, float | None]:
    """Return the cached repository with ``n`` calexps, its build date and build seconds."""
    root = c.BENCH_DIR / f"run-{n}"
    marker = root / "built.json"
    if marker.exists() and not rebuild:
        info = json.loads(marker.read_text())
        print(f"Reusing {root} (built {info['built']}; --rebuild to rebuild)", flush=True)
        return root / "repo", info["built"], info.get("seconds")
    from butlerfs.demo import make_demo_repo

    print(f"Building a demo repository with {n} calexps under {root} ...", flush=True)
    c.remove_tree(root)
    root.mkdir(parents=True)
    start = time.perf_counter()
    make_demo_repo(str(root / "repo"), visits=n // DETECTORS, detectors=DETECTORS, image_size=IMAGE_SIZE)
    seconds = time.perf_counter() - start
    built = c.today()
    marker.write_text(json.dumps({"n": n, "built": built, "seconds": seconds}))
    return root / "repo", built, seconds


def calexp_files(repo: Path, where: str) -> list[str]:
    """The calexps' paths at rest, find-first in the collections, in data ID order."""
    from lsst.daf.butler import Butler

    butler = Butler.from_config(str(repo))
    refs = butler.query_datasets("calexp", collections=COLLECTIONS, where=where, find_first=True)
    refs = sorted(refs, key=lambda r: tuple(r.dataId.required.values()))
    paths = [butler.getURI(ref).ospath for ref in refs]
    butler.close()
    return paths


def visit_where(repo: Path, n_ids: int) -> str:
    """A ``--where`` selecting the first ``n_ids / 4`` visits (all of them: just the instrument)."""
    from lsst.daf.butler import Butler

    butler = Butler.from_config(str(repo))
    visits = sorted({r.dataId["visit"] for r in butler.query_datasets("calexp", collections=COLLECTIONS)})
    butler.close()
    base = f"instrument='{INSTRUMENT}'"
    wanted = visits[: n_ids // DETECTORS]
    if len(wanted) == len(visits):
        return base
    return f"{base} AND visit IN ({', '.join(str(v) for v in wanted)})"


# -- the arms -------------------------------------------------------------------------------------


@dataclass
class Arm:
    """Repeated timings of one arm, with the 1-minute load average before each."""

    wall: c.Sample = field(default_factory=c.Sample)
    load: list[float] = field(default_factory=list)
    fixed: c.Sample = field(default_factory=c.Sample)
    """``butlerfs run``: wall time outside the data IDs' span (start-up + tear-down)."""
    startup: c.Sample = field(default_factory=c.Sample)
    teardown: c.Sample = field(default_factory=c.Sample)
    span: c.Sample = field(default_factory=c.Sample)
    """``butlerfs run``: first ``started`` to last ``finished``."""
    program: c.Sample = field(default_factory=c.Sample)
    """``butlerfs run``: median over data IDs of the manifests' ``wall_time`` (the program)."""
    per_id: c.Sample = field(default_factory=c.Sample)
    """``butlerfs run``: median over data IDs of ``finished - started``."""
    overlay: str = ""
    cpu: c.Sample = field(default_factory=c.Sample)
    """User + system CPU seconds of the command and every descendant it (or they) reaped."""


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], arm: Arm) -> float:
    arm.load.append(os.getloadavg()[0])
    before = children_cpu()
    elapsed, _ = c.run(cmd)
    arm.cpu.add(children_cpu() - before)
    arm.wall.add(elapsed)
    return elapsed


def loop_command(listing: Path) -> list[str]:
    return ["sh", "-c", 'for f in $(cat "$1"); do sh -c "$0" _ "$f"; done', SCRIPT, str(listing)]


def xargs_command(listing: Path, jobs: int) -> list[str]:
    return ["xargs", "-P", str(jobs), "-n", "1", "-d", "\\n", "-a", str(listing), *PROGRAM]


def butlerfs_command(repo: Path, where: str, workdir: Path, jobs: int, sandbox: str = "on",
                     overlay: str = "auto") -> list[str]:
    return [c.find_tool("butlerfs"), "run", str(repo), "-c", COLLECTIONS, "-i", "calexp=calexp",
            "-w", where, "--sandbox", sandbox, "--overlay", overlay, "-j", str(jobs),
            "--workdir", str(workdir), "--", *PROGRAM, "{calexp}"]


def _stamp(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def run_butlerfs(repo: Path, where: str, workdir: Path, jobs: int, n_ids: int, arm: Arm,
                 sandbox: str = "on", overlay: str = "auto") -> None:
    """Time one ``butlerfs run`` in a fresh work directory; split fixed and per-data-ID time."""
    c.remove_tree(workdir)
    cmd = butlerfs_command(repo, where, workdir, jobs, sandbox, overlay)
    arm.load.append(os.getloadavg()[0])
    before = children_cpu()
    t0 = time.time()
    elapsed, result = c.run(cmd, stdout=subprocess.PIPE)
    cpu = children_cpu() - before
    t1 = t0 + elapsed
    manifests = [json.loads(p.read_text()) for p in workdir.rglob("manifest.json")]
    if len(manifests) != n_ids or any(m["status"] != "ok" for m in manifests):
        raise RuntimeError(f"{shlex.join(cmd)}: expected {n_ids} ok data IDs, got "
                           f"{[m['status'] for m in manifests]}\n{result.stdout.decode()[-2000:]}")
    first = min(_stamp(m["started"]) for m in manifests)
    last = max(_stamp(m["finished"]) for m in manifests)
    arm.wall.add(elapsed)
    arm.cpu.add(cpu)
    arm.span.add(last - first)
    arm.startup.add(first - t0)
    arm.teardown.add(t1 - last)
    arm.fixed.add(elapsed - (last - first))
    arm.program.add(statistics.median(m["wall_time"] for m in manifests))
    arm.per_id.add(statistics.median(_stamp(m["finished"]) - _stamp(m["started"]) for m in manifests))
    arm.overlay = manifests[0]["overlay"]
    c.remove_tree(workdir)


FAILURES: list[str] = []
"""Failed ``butlerfs run`` commands (each retried once), for the report."""


def run_butlerfs_retrying(repo: Path, where: str, workdir: Path, jobs: int, n_ids: int, arm: Arm,
                          sandbox: str = "on", overlay: str = "auto") -> None:
    """`run_butlerfs`; a failure is recorded, its leftovers cleaned up, and the run retried once."""
    try:
        run_butlerfs(repo, where, workdir, jobs, n_ids, arm, sandbox, overlay)
        return
    except RuntimeError as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        what = f"`-j {jobs} --overlay {overlay} --sandbox {sandbox}`"
        FAILURES.append(f"{what}: {lines[-1].strip() if lines else err}")
        print(f"  FAILED ({FAILURES[-1]}); retrying once", file=sys.stderr, flush=True)
        left = our_mounts(workdir)
        for point in sorted(left, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False)
        if left:
            FAILURES[-1] += f" (left mounted: {len(left)} mount(s), unmounted by the benchmark)"
        c.remove_tree(workdir)
        del arm.load[-1]
    run_butlerfs(repo, where, workdir, jobs, n_ids, arm, sandbox, overlay)


def our_mounts(root: Path) -> list[str]:
    """Mount points under ``root`` (left over only if a run crashed)."""
    out = []
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            point = line.split()[1].encode().decode("unicode_escape")
            if point.startswith(str(root) + "/"):
                out.append(point)
    return out


def cleanup(root: Path) -> None:
    for point in sorted(our_mounts(root), key=len, reverse=True):
        print(f"Unmounting leftover {point}", file=sys.stderr)
        subprocess.run(["umount", "-l", point], check=False)
    c.remove_tree(root / "work")


# -- report ---------------------------------------------------------------------------------------


def loads(arm: Arm) -> str:
    return f"{statistics.median(arm.load):.1f} ({max(arm.load):.1f})"


def verdict(value: float, target: float, at_most: bool) -> str:
    ok = value <= target if at_most else value >= target
    return f"{'meets' if ok else 'misses'} the target {'<=' if at_most else '>='} {target}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-ids", type=int, default=None,
                        help="data IDs, a multiple of 4 (default 100; 20 with --quick)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5; 1 with --quick)")
    parser.add_argument("--extra-reps", type=int, default=None,
                        help="repetitions of the overlay/sandbox table (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 data IDs, one repetition")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the cached repository")
    parser.add_argument("--nice", type=int, default=-10,
                        help="niceness of the benchmark and every arm (default -10: less disturbed by "
                        "other work on the machine; 0 to leave it)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the machine's load average to fall below 1")
    parser.add_argument("--no-extra", action="store_true", help="skip the overlay/sandbox table")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    n = args.data_ids or (20 if args.quick else 100)
    if n % DETECTORS or n < DETECTORS:
        sys.exit(f"--data-ids must be a positive multiple of {DETECTORS}")
    reps = args.reps or (1 if args.quick else 5)
    extra_reps = args.extra_reps or (1 if args.quick else 2)
    started = time.perf_counter()
    niceness = os.nice(0)
    if args.nice != niceness:
        try:
            niceness = os.nice(args.nice - niceness)
        except OSError as err:
            print(f"Cannot set the niceness to {args.nice} ({err.strerror}); staying at {niceness}",
                  file=sys.stderr)

    c.wait_for_quiet(args.wait_idle)
    repo, built, build_s = ensure_repo(n, args.rebuild)
    root = repo.parent
    # Machine facts and the code measured are taken now: the tree may change during a long run.
    facts, load_at_start = c.machine_facts(root), c.load_average()
    wrapper_rev = c.tree_revision("wrapper/")
    work = root / "work"
    cleanup(root)
    work.mkdir()
    where = f"instrument='{INSTRUMENT}'"
    files = calexp_files(repo, where)
    if len(files) != n:
        raise RuntimeError(f"expected {n} calexps, found {len(files)}")
    listing = root / "calexps.txt"
    listing.write_text("".join(f + "\n" for f in files))
    n_extra = min(n, EXTRA_MAX)
    extra_where = visit_where(repo, n_extra)
    for f in files:  # the artifacts in the page cache for every arm alike
        Path(f).read_bytes()

    arms = {name: Arm() for name in ("loop", "xargs", "j1", "j2")}
    extras: dict[tuple[str, str], Arm] = {}
    try:
        print(f"Warm-up: one untimed butlerfs run -j 2 over {n} data IDs ...", flush=True)
        run_butlerfs(repo, where, work / "warmup", 2, n, Arm())
        for rep in range(reps):
            print(f"Repetition {rep + 1}/{reps}: shell loop, butlerfs run -j 1, xargs -P 2, "
                  "butlerfs run -j 2 ...", flush=True)
            timed(loop_command(listing), arms["loop"])
            run_butlerfs_retrying(repo, where, work / f"j1-{rep}", 1, n, arms["j1"])
            timed(xargs_command(listing, 2), arms["xargs"])
            run_butlerfs_retrying(repo, where, work / f"j2-{rep}", 2, n, arms["j2"])
            print("  " + ", ".join(f"{k} {a.wall.values[-1]:.2f} s" for k, a in arms.items()), flush=True)
        if not args.no_extra:
            for rep in range(extra_reps):
                for overlay in ("kernel", "fuse", "links"):
                    for sandbox in ("on", "off"):
                        arm = extras.setdefault((overlay, sandbox), Arm())
                        print(f"Extra {rep + 1}/{extra_reps}: -j 1 --overlay {overlay} --sandbox {sandbox}, "
                              f"{n_extra} data IDs ...", flush=True)
                        workdir = work / f"x-{overlay}-{sandbox}-{rep}"
                        run_butlerfs_retrying(repo, extra_where, workdir, 1, n_extra, arm,
                                              sandbox=sandbox, overlay=overlay)
    finally:
        cleanup(root)
        with contextlib.suppress(OSError):
            work.rmdir()

    loop, xargs, j1, j2 = arms["loop"], arms["xargs"], arms["j1"], arms["j2"]
    loop_per = loop.wall.median / n
    j1_per = j1.span.median / n
    per_ratio = j1_per / loop_per
    best_ratio = j1.span.min / loop.wall.min
    whole_ratio = j1.wall.median / loop.wall.median
    speedup_span = j1.span.median / j2.span.median
    speedup_whole = j1.wall.median / j2.wall.median
    speedup_best = j1.span.min / j2.span.min
    vs_xargs_span = j2.span.median / xargs.wall.median
    vs_xargs_whole = j2.wall.median / xargs.wall.median
    vs_xargs_best = j2.span.min / xargs.wall.min

    def ms(value: float) -> str:
        return f"{value * 1e3:.0f} ms" if value < 10 else f"{value:.1f} s"

    def row(label: str, arm: Arm, per: float | None = None) -> list[str]:
        cpu = f"{arm.cpu.median / n * 1e3:.1f} ms"
        if arm.span.values:
            return [label, f"{c.seconds(arm.wall.median)} ({c.seconds(arm.wall.min)})",
                    c.seconds(arm.fixed.median), c.seconds(arm.span.median),
                    f"{arm.span.median / n * 1e3:.1f} ms ({arm.span.min / n * 1e3:.1f} ms)", cpu, loads(arm)]
        return [label, f"{c.seconds(arm.wall.median)} ({c.seconds(arm.wall.min)})", "-", "-",
                f"{arm.wall.median / n * 1e3:.1f} ms ({arm.wall.min / n * 1e3:.1f} ms)", cpu, loads(arm)]

    main_table = c.table(
        ["arm", "wall median (best)", "fixed: start-up + tear-down", "data-ID span", "per data ID (best)",
         "CPU / N (fixed part included)", "load avg median (max)"],
        [row("shell loop", loop), row("`butlerfs run -j 1 --sandbox on`", j1),
         row("`xargs -P 2`", xargs), row("`butlerfs run -j 2 --sandbox on`", j2)],
    )
    ratio_table = c.table(
        ["ratio", "per data ID (fixed cost excluded), medians", "same, best runs", "whole command, medians",
         "target"],
        [["`butlerfs run -j 1` / shell loop", c.ratio(per_ratio), c.ratio(best_ratio), c.ratio(whole_ratio),
          "<= 1.15"],
         ["speed-up of `butlerfs run`: -j 1 / -j 2", c.ratio(speedup_span), c.ratio(speedup_best),
          c.ratio(speedup_whole), ">= 1.8"],
         ["`butlerfs run -j 2` / `xargs -P 2`", c.ratio(vs_xargs_span), c.ratio(vs_xargs_best),
          c.ratio(vs_xargs_whole), "-"]],
    )
    breakdown = c.table(
        ["", "-j 1", "-j 2"],
        [["start-up: command start to first data ID's `started`", ms(j1.startup.median),
          ms(j2.startup.median)],
         ["tear-down: last data ID's `finished` to command exit", ms(j1.teardown.median),
          ms(j2.teardown.median)],
         ["one data ID, `started` to `finished` (median)", ms(j1.per_id.median), ms(j2.per_id.median)],
         ["of which the program in its sandbox (manifest `wall_time`, median)", ms(j1.program.median),
          ms(j2.program.median)],
         ["shell loop: one iteration (wall / N)", ms(loop_per), ""]],
    )
    extra_table = ""
    if extras:
        extra_rows = []
        for (overlay, sandbox), arm in extras.items():
            per = arm.span.median / n_extra
            extra_rows.append([f"`--overlay {overlay} --sandbox {sandbox}`", arm.overlay,
                               c.seconds(arm.wall.median), c.seconds(arm.fixed.median),
                               f"{per * 1e3:.1f} ms", f"{(per - loop_per) * 1e3:.1f} ms",
                               f"{(arm.per_id.median - arm.program.median) * 1e3:.1f} ms",
                               c.ratio(per / loop_per), loads(arm)])
        extra_table = c.table(
            ["`butlerfs run -j 1`", "overlay used", "wall median", "fixed", "per data ID",
             "overhead per data ID vs loop", "data ID minus program (median)", "ratio to loop per data ID",
             "load avg median (max)"],
            extra_rows,
        )
    command = "`.venv/bin/python scripts/bench/bench_run.py" + (f" {shlex.join(sys.argv[1:])}`"
                                                                if sys.argv[1:] else "`")
    quick = " — quick smoke run, not a result" if args.quick else ""
    conclusion = (
        f"Per data ID, `butlerfs run -j 1` took {j1_per * 1e3:.0f} ms against the shell loop's "
        f"{loop_per * 1e3:.0f} ms: ratio {per_ratio:.3f}, which {verdict(per_ratio, 1.15, True)} "
        f"(whole command, with the fixed {j1.fixed.median:.1f} s of start-up and tear-down: "
        f"{whole_ratio:.2f}). `-j 2` ran the data IDs {speedup_span:.3f}x as fast as `-j 1` "
        f"({verdict(speedup_span, 1.8, False)}; whole command {speedup_whole:.3f}x, which "
        f"{verdict(speedup_whole, 1.8, False).split(' the')[0]} it), and its data-ID span was "
        f"{vs_xargs_span:.2f}x `xargs -P 2`'s wall time. In the best of the {reps} repetitions the "
        f"per-data-ID ratio was {best_ratio:.3f}. `butlerfs run -j 1` used "
        f"{j1.cpu.median / n * 1e3:.0f} ms of CPU per data ID (its runner, mount daemon, sandbox and "
        f"program), the shell loop {loop.cpu.median / n * 1e3:.1f} ms."
    )
    caution = c.contention_note(load_at_start)
    if caution:
        conclusion += caution + (
            " Here the runner, which needs CPU where the loop mostly sleeps, waits for it: compare the "
            "medians with the best runs."
        )
    body = f"""
## `butlerfs run` vs a shell loop (`bench_run.py`)

*{c.today()}{quick}*

**Question.** What does `butlerfs run` add per data ID to a plain shell loop running the same
program on the same files, for a 0.2-second program over {n} data IDs with the sandbox on
(target <= 1.15x), and how much faster is `-j 2` on 2 cores (target >= 1.8x)?

**Command.** {command} (as root). Demo repository of {n} calexp data IDs
(`make_demo_repo(visits={n // DETECTORS}, detectors={DETECTORS}, image_size={IMAGE_SIZE})`, 66 KB files,
cached under `{root}`, built {built}{f' in {build_s:.0f} s' if build_s else ''}). The program in every arm is
`{shlex.join(PROGRAM)} FILE` (a new `sh`, which runs `head` on the first FITS block, then
`sleep {SLEEP}`). Arms, interleaved in each of {reps} repetition(s), each timed as one whole
command (median, best in parentheses):

- shell loop: `sh -c 'for f in $(cat LIST); do sh -c "$0" _ "$f"; done' '{SCRIPT}' LIST`, where
  LIST holds the {n} artifacts at rest (paths from `butler.getURI`, found once, untimed);
- `{shlex.join(xargs_command(Path('LIST'), 2))}`;
- `butlerfs run REPO -c {COLLECTIONS} -i calexp=calexp -w "instrument='{INSTRUMENT}'"
  --sandbox on -j J --workdir FRESH -- {shlex.join(PROGRAM)} '{{calexp}}'`, console only (no
  outputs), the default overlay (`auto`: {j1.overlay}), a new work directory each time.

The artifacts are in the page cache for every arm (read once before; an untimed `butlerfs run
-j 2` first). "Fixed" is the command's wall time outside the span from the first data ID's
manifest `started` to the last one's `finished`: interpreter start and imports, planning (the
Butler query), the overlay and bubblewrap probes, mounting and unmounting the run's butlerfs
mount, the summary. "Per data ID" is that span / {n}; the per-data-ID ratio compares it with the
shell loop's wall time / {n}. "CPU / N": user + system CPU seconds of the command and of every
descendant reaped (`getrusage(RUSAGE_CHILDREN)` before and after) / {n}. Load average: the
1-minute value just before each measurement. The benchmark and so every arm ran at niceness
{niceness}, to be less disturbed by other work on the machine.

**Machine.**
{chr(10).join(facts)}
- wrapper/ at {wrapper_rev}
{c.load_line(load_at_start)}

{main_table}

{ratio_table}

Where a data ID's time goes (medians over repetitions of per-run values):

{breakdown}
"""
    if extra_table:
        body += f"""
Overlay modes and the sandbox, `butlerfs run -j 1` over the first {n_extra} data IDs
({extra_reps} repetition(s); "overhead" is per data ID minus the shell loop's iteration above;
"data ID minus program" is a manifest's `finished - started` minus its `wall_time`: staging,
overlay mount and unmount, changed-file scan, manifest; the sandbox's start-up is inside
`wall_time`):

{extra_table}
"""
    if FAILURES:
        body += "\nFailed runs (each was retried once; the tables hold the retries):\n\n"
        body += "".join(f"- {failure}\n" for failure in FAILURES)
        conclusion += f" {len(FAILURES)} `butlerfs run` command(s) failed and were retried (listed above)."
    body += f"""
**Conclusion.** {conclusion} Total benchmark time {time.perf_counter() - started:.0f} s.
"""
    c.publish(SECTION, body, args.no_docs)
    print(main_table)
    print(ratio_table)
    print(breakdown)
    if extra_table:
        print(extra_table)
    print(conclusion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
