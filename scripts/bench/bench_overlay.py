"""Per-data-ID cost of each overlay mode of ``butlerfs run``, as root and as an ordinary user.

Run it as root: it runs every arm itself, then again as an ordinary user (``--user``, default
``butlerfs-ci``, created if missing as ``scripts/ci-as-user.sh`` does) through ``runuser``, in
a work directory that user owns. The repository is the one of ``bench_run.py`` (``make_demo_repo(visits=N/4,
detectors=4, image_size=64)``, cached under ``$BUTLERFS_BENCH_DIR/run-<N>/``), and so is the
program, but without its sleep (``--sleep``): ``sh -c 'head -c 2880 "$1" >/dev/null' _ FILE``.

Arms, interleaved in each repetition: ``butlerfs run -j 1 --overlay MODE --sandbox on|off``
for MODE in ``kernel`` (as root a mount namespace of the program's own, as a user a user
namespace), ``fuse`` and ``links``, for each identity; and the shell loop over the artifacts
at rest, the baseline. Per data ID: the span from the first data ID's manifest ``started`` to
the last one's ``finished``, divided by N; "data ID minus program": a manifest's ``finished -
started`` minus its ``wall_time`` (staging, overlay mount and unmount, changed-file scan,
manifest), median over data IDs and repetitions.

Writes the ``bench:overlay`` section of ``docs/BENCHMARKS.md``. ``--quick``: 12 data IDs,
one repetition.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shlex
import shutil
import sys
import time
from pathlib import Path

import _common as c
import bench_run as br

SECTION = "overlay"
MODES = ("kernel", "fuse", "links")


def as_user(user: str | None):
    """Wrap a command so that it runs as ``user`` (`None`: as this process)."""
    if user is None:
        return None
    home = pwd.getpwnam(user).pw_dir
    path = f"{c.VENV_BIN}:/usr/local/bin:/usr/bin:/bin"

    def wrap(cmd: list[str]) -> list[str]:
        env = [f"HOME={home}", f"PATH={path}", "LANG=C.UTF-8"]
        return ["runuser", "-u", user, "--", "env", "-i", *env, *cmd]

    return wrap


def run_arm(repo: Path, where: str, workdir: Path, n: int, arm: br.Arm, overlay: str, sandbox: str,
            user: str | None) -> None:
    """One ``butlerfs run -j 1`` as ``user``, timed by `bench_run.run_butlerfs`."""
    wrap = as_user(user)
    if wrap is None:
        br.run_butlerfs(repo, where, workdir, 1, n, arm, sandbox=sandbox, overlay=overlay)
        return
    original = br.butlerfs_command
    try:
        br.butlerfs_command = lambda *a, **k: wrap(original(*a, **k))  # type: ignore[assignment]
        br.run_butlerfs(repo, where, workdir, 1, n, arm, sandbox=sandbox, overlay=overlay)
    finally:
        br.butlerfs_command = original  # type: ignore[assignment]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-ids", type=int, default=None, help="data IDs, a multiple of 4 (default 40)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--user", default="butlerfs-ci", help="the ordinary user (default butlerfs-ci)")
    parser.add_argument("--sleep", type=float, default=0.0,
                        help="seconds the program sleeps after reading its input (default 0: the "
                        "overlay's cost is not hidden behind the program's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 12 data IDs, one repetition")
    parser.add_argument("--nice", type=int, default=-10,
                        help="niceness of the benchmark and every arm (default -10; 0 to leave it)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the machine's load average to fall below 1")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_overlay.py compares root with an ordinary user: run it as root")
    uid, gid, _ = c.ordinary_user(args.user)
    n = args.data_ids or (12 if args.quick else 40)
    if args.sleep:
        br.SCRIPT = f'head -c 2880 "$1" >/dev/null; sleep {args.sleep:g}'
    else:
        br.SCRIPT = 'head -c 2880 "$1" >/dev/null'
    br.PROGRAM = ["sh", "-c", br.SCRIPT, "_"]
    if n % br.DETECTORS or n < br.DETECTORS:
        sys.exit(f"--data-ids must be a positive multiple of {br.DETECTORS}")
    reps = args.reps or (1 if args.quick else 3)
    started = time.perf_counter()
    os.nice(args.nice - os.nice(0))
    c.wait_for_quiet(args.wait_idle)
    repo, built, _ = br.ensure_repo(n, False)
    root = repo.parent
    facts, load_at_start = c.machine_facts(root), c.load_average()
    revision = c.tree_revision("wrapper/")
    where = br.visit_where(repo, n)
    files = br.calexp_files(repo, where)
    listing = root / "overlay-calexps.txt"
    listing.write_text("".join(f + "\n" for f in files))
    listing.chmod(0o644)
    for path in files:
        Path(path).read_bytes()
    work = root / "overlay-work"
    c.remove_tree(work)
    work.mkdir(mode=0o755)
    (work / "user").mkdir()
    os.chown(work / "user", uid, gid)
    loop = br.Arm()
    arms: dict[tuple[str, str, str], br.Arm] = {}
    identities = [("root", None), (args.user, args.user)]
    try:
        for rep in range(reps):
            print(f"Repetition {rep + 1}/{reps} ({n} data IDs) ...", flush=True)
            br.timed(br.loop_command(listing), loop)
            for label, user in identities:
                for overlay in MODES:
                    for sandbox in ("on", "off"):
                        arm = arms.setdefault((label, overlay, sandbox), br.Arm())
                        workdir = work / ("user" if user else "root") / f"{overlay}-{sandbox}-{rep}"
                        run_arm(repo, where, workdir, n, arm, overlay, sandbox, user)
                        print(f"  {label} --overlay {overlay} --sandbox {sandbox}: "
                              f"{arm.span.values[-1] / n * 1e3:.1f} ms per data ID", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        listing.unlink(missing_ok=True)

    loop_per = loop.wall.median / n
    rows = []
    for (label, overlay, sandbox), arm in arms.items():
        per = arm.span.median / n
        rows.append([label, f"`--overlay {overlay} --sandbox {sandbox}`", arm.overlay,
                     f"{per * 1e3:.1f} ms ({arm.span.min / n * 1e3:.1f})",
                     f"{(per - loop_per) * 1e3:.1f} ms",
                     f"{(arm.per_id.median - arm.program.median) * 1e3:.1f} ms",
                     f"{arm.program.median * 1e3:.0f} ms", br.loads(arm)])
    table = c.table(["as", "`butlerfs run -j 1`", "overlay used", "per data ID, median (best)",
                     "overhead vs loop", "data ID minus program", "program (sandbox included)",
                     "load avg median (max)"], rows)

    def per(label: str, overlay: str, sandbox: str) -> float:
        return arms[(label, overlay, sandbox)].span.median / n * 1e3

    conclusion = (
        f"The shell loop took {loop_per * 1e3:.0f} ms per data ID. Without the sandbox, per data ID: "
        + "; ".join(
            f"{label} kernel {per(label, 'kernel', 'off'):.0f} ms, fuse {per(label, 'fuse', 'off'):.0f} ms, "
            f"links {per(label, 'links', 'off'):.0f} ms"
            for label, _ in identities
        )
        + ". With the sandbox: "
        + "; ".join(
            f"{label} kernel {per(label, 'kernel', 'on'):.0f} ms, fuse {per(label, 'fuse', 'on'):.0f} ms, "
            f"links {per(label, 'links', 'on'):.0f} ms"
            for label, _ in identities
        )
        + "."
    )
    conclusion += c.contention_note(load_at_start)
    command = "`.venv/bin/python scripts/bench/bench_overlay.py" + (
        f" {shlex.join(sys.argv[1:])}`" if sys.argv[1:] else "`")
    quick = " — quick smoke run, not a result" if args.quick else ""
    body = f"""
## Overlay modes as root and as a user (`bench_overlay.py`)

*{c.today()}{quick}*

**Question.** What does each overlay mode cost per data ID, as root and as an ordinary user
(the kernel overlay in a mount namespace of the program's own: a plain one for root, a user
namespace mapping the user to itself otherwise)?

**Command.** {command} (as root; the user's arms through `runuser -u {args.user}`). The
repository of `bench_run.py` ({n} of its calexp data IDs, built {built}); the program
`{shlex.join(br.PROGRAM)} FILE`; `butlerfs run -j 1 -i calexp=calexp --overlay MODE --sandbox
on|off`, console only, a fresh work directory each time, {reps} repetition(s), interleaved,
at niceness {os.nice(0)}.
"Per data ID": first `started` to last `finished` over {n}; "data ID minus program": a
manifest's `finished - started` minus its `wall_time` (staging, overlay mount and unmount,
changed-file scan, manifest; a kernel overlay is mounted inside `wall_time`, by the program's
reaper, and so is the sandbox's start-up), medians. Shell loop: `for f in LIST; do PROGRAM
"$f"; done` over the artifacts at rest, as root.

**Machine.**
{chr(10).join(facts)}
- wrapper/ at {revision}
{c.load_line(load_at_start)}

{table}

**Conclusion.** {conclusion} Total benchmark time {time.perf_counter() - started:.0f} s.
"""
    c.publish(SECTION, body, args.no_docs)
    print(table)
    print(conclusion)
    return 0


if __name__ == "__main__":
    sys.exit(main())
