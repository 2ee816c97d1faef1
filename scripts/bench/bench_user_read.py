"""Cold sequential reads through a mount made by an ordinary user: does the 128 KiB read-ahead matter?

A daemon running as root raises its mount's kernel read-ahead to 4 MiB (``/sys/class/bdi/
0:N/read_ahead_kb``); a user's daemon cannot (the sysfs file is root's, and FUSE can only
lower the read-ahead from its side), so a user's mount reads ahead 128 KiB. This script, run
as root, measures what that costs the user: the daemon and every ``dd`` run as ``--user``
(default ``butlerfs-ci``, created if missing as ``scripts/ci-as-user.sh`` does) through
``runuser``, and root drops the page cache before every read
(a user cannot) and, for the comparison arm, writes the 4 MiB read-ahead into the user's mount
as a root daemon would. Arms, interleaved in each repetition, each a cold ``dd bs=1M`` of one
large artifact, timed by ``dd`` itself:

* POSIX: the artifact at rest (the baseline); the user's mount as it is (kernel read-ahead
  128 KiB, the daemon's own read-ahead of the artifact on); the same without the daemon's
  read-ahead (``BUTLERFS_POSIX_READ_AHEAD_KB=0``); each with the kernel read-ahead set to
  4 MiB by root;
* S3 (one ``python -m moto.server``, objects in memory): a fresh mount with an empty block
  cache for every read, read-ahead 128 KiB and 4 MiB.

With ``perf`` (root), one more read per arm counts the FUSE ``READ`` requests the kernel sent
(``fuse:fuse_request_send``): their number shows the request size.

Writes the ``bench:user-read`` section of ``docs/BENCHMARKS.md``. ``--quick``: 64 MiB, one
repetition.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import _common as c
import bench_read
import bench_s3

sys.path.insert(0, str(c.ROOT / "tests"))
from s3server import MotoServer, running  # noqa: E402

SECTION = "user-read"
ROOT_READ_AHEAD = 4096
"""What a root daemon sets (``butlerfs.mounting.READ_AHEAD_KB``)."""


class User:
    """Commands run as the ordinary user, with a clean environment plus ``extra``."""

    def __init__(self, name: str, home: Path) -> None:
        self.name = name
        self.home = home
        self.extra: dict[str, str] = {}

    def argv(self, cmd: list[str]) -> list[str]:
        env = [f"HOME={self.home}", f"PATH={c.VENV_BIN}:/usr/bin:/bin", "LANG=C.UTF-8",
               f"XDG_CACHE_HOME={self.home}/cache", *(f"{k}={v}" for k, v in self.extra.items())]
        return ["runuser", "-u", self.name, "--", "env", "-i", *env, *cmd]

    def run(self, cmd: list[str]) -> str:
        result = subprocess.run(self.argv(cmd), capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} as {self.name} failed: {result.stderr.strip()[-2000:]}")
        return result.stdout + result.stderr


def dd_seconds(user: User, path: str) -> float:
    """Cold ``dd bs=1M`` of ``path`` as the user; the seconds ``dd`` reports."""
    c.drop_caches()
    said = user.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"])
    match = re.search(r"copied, ([0-9.e+-]+) s", said)
    if match is None:
        raise RuntimeError(f"no time in dd's output: {said}")
    return float(match.group(1))


@contextlib.contextmanager
def user_mount(user: User, repo: Path, mountpoint: Path, run: str, read_ahead: int | None,
               *options: str, daemon_read_ahead: bool = True) -> Iterator[tuple[str, int]]:
    """The user mounts ``repo``; root sets its read-ahead (`None`: leaves it).

    Yields the artifact's path in the mount and the mount's device number.
    """
    c.fresh_dir(mountpoint)
    os.chown(mountpoint, *user_ids(user))
    env = [] if daemon_read_ahead else ["env", "BUTLERFS_POSIX_READ_AHEAD_KB=0"]
    user.run([*env, "butlerfs", "mount", str(repo), str(mountpoint), "-c", run, *options])
    try:
        files = user.run(["find", str(mountpoint), "-type", "f"]).split()
        st_dev = int(user.run(["stat", "-c", "%d", str(mountpoint)]))
        sysfs = f"/sys/class/bdi/{os.major(st_dev)}:{os.minor(st_dev)}/read_ahead_kb"
        if read_ahead is not None:
            Path(sysfs).write_text(f"{read_ahead}\n")
        else:
            found = int(Path(sysfs).read_text())
            if found != 128:
                raise RuntimeError(f"the user's mount reads ahead {found} KiB, not 128")
        yield files[0], st_dev
    finally:
        user.run(["butlerfs", "umount", str(mountpoint)])


def user_ids(user: User) -> tuple[int, int]:
    entry = pwd.getpwnam(user.name)
    return entry.pw_uid, entry.pw_gid


def read_requests(user: User, st_dev: int, path: str) -> int | None:
    """FUSE READ requests the kernel sent to the mount ``st_dev`` for one cold read (`None`: no perf)."""
    if not c.can_trace_fuse():
        return None
    c.drop_caches()
    data = c.BENCH_DIR / "user-read.perf"
    subprocess.run(["perf", "record", "-q", "-a", "-e", "fuse:fuse_request_send", "-o", str(data), "--",
                    *user.argv(["dd", f"if={path}", "of=/dev/null", "bs=1M"])],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    script = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, text=True).stdout
    data.unlink(missing_ok=True)
    mine = f"connection {os.minor(st_dev)} "
    return sum(1 for line in script.splitlines() if mine in line and "(FUSE_READ)" in line)


def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=None,
                        help="POSIX artifact size (default 512; 64 with --quick)")
    parser.add_argument("--s3-size-mib", type=int, default=None,
                        help="S3 artifact size (default 64; 32 with --quick)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5; 1 with --quick)")
    parser.add_argument("--user", default="butlerfs-ci", help="the ordinary user (default butlerfs-ci)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one repetition")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the machine's load average to fall below 1")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    c.require_root_for_cold()
    _, _, home = c.ordinary_user(args.user)
    size_mib = args.size_mib or (64 if args.quick else 512)
    s3_mib = args.s3_size_mib or (32 if args.quick else 64)
    reps = args.reps or (1 if args.quick else 5)
    c.wait_for_quiet(args.wait_idle)
    facts, load_at_start = c.machine_facts(c.BENCH_DIR), c.load_average()
    started = time.perf_counter()
    user = User(args.user, home)
    root = c.BENCH_DIR / "user-read"
    c.remove_tree(root)
    root.mkdir(parents=True)
    root.chmod(0o755)
    mountpoint = root / "mnt"
    keys = ("native", "posix128", "posix128-off", "posix4096", "posix4096-off", "s3128", "s34096")
    times: dict[str, c.Sample] = {k: c.Sample() for k in keys}
    requests: dict[str, int | None] = {}
    server = MotoServer(env=bench_s3.MOTO_ENV)
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(name, None)
    try:
        print(f"Building a repository with one {size_mib} MiB artifact ...", flush=True)
        native = str(bench_read.build_repo(root / "posix", size_mib))
        posix_repo = root / "posix" / "repo"
        server.start()
        os.environ.update(server.environ())
        user.extra = {k: v for k, v in server.environ().items()}
        with running(server):
            server.client().create_bucket(Bucket=bench_s3.BUCKET)
            print(f"Building an S3 repository with one {s3_mib} MiB artifact ...", flush=True)
            s3 = bench_s3.build_repo(root / "s3", s3_mib, 1, 1)
            s3_size = s3.sizes[s3.uris[bench_s3.BIG][0]]
            caches = root / "caches"
            caches.mkdir()
            os.chown(caches, *user_ids(user))
            for rep in range(reps):
                times["native"].add(dd_seconds(user, native))
                for ra in (None, ROOT_READ_AHEAD):
                    for own in (True, False):
                        with user_mount(user, posix_repo, mountpoint, bench_read.RUN, ra,
                                        daemon_read_ahead=own) as (path, _):
                            times[f"posix{ra or 128}{'' if own else '-off'}"].add(dd_seconds(user, path))
                for ra in (None, ROOT_READ_AHEAD):
                    cache = caches / f"{rep}-{ra}"
                    with user_mount(user, s3.repo, mountpoint, bench_s3.RUN, ra, "-t", bench_s3.BIG,
                                    "--cache-dir", str(cache)) as (path, _):
                        times[f"s3{ra or 128}"].add(dd_seconds(user, path))
                print(f"  rep {rep + 1}: " + ", ".join(f"{k} {v.values[-1]:.2f} s" for k, v in times.items()),
                      flush=True)
            for ra in (None, ROOT_READ_AHEAD):
                with user_mount(user, posix_repo, mountpoint, bench_read.RUN, ra) as (path, dev):
                    requests[f"posix{ra or 128}"] = read_requests(user, dev, path)
                with user_mount(user, s3.repo, mountpoint, bench_s3.RUN, ra, "-t", bench_s3.BIG,
                                "--cache-dir", str(caches / f"perf-{ra}")) as (path, dev):
                    requests[f"s3{ra or 128}"] = read_requests(user, dev, path)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    size = size_mib * c.MIB

    def cell(key: str, nbytes: int) -> str:
        s = times[key]
        return f"{mbps(nbytes, s.median):.0f} ({mbps(nbytes, s.min):.0f})"

    def req(key: str, nbytes: int) -> str:
        n = requests.get(key)
        return "-" if not n else f"{n} ({nbytes / n / 1024:.0f} KiB)"

    rows = [
        ["POSIX, at rest (`dd` of the datastore's file)", cell("native", size), "-", "-"],
        *(
            [f"POSIX, the user's mount: kernel read-ahead {label}, the daemon's own {own}",
             cell(key, size), c.ratio(times["native"].median / times[key].median), req(key, size)]
            for key, label, own in (
                ("posix128", "128 KiB", "on (default)"),
                ("posix128-off", "128 KiB", "off"),
                ("posix4096", f"{ROOT_READ_AHEAD} KiB (set by root)", "on"),
                ("posix4096-off", f"{ROOT_READ_AHEAD} KiB (set by root)", "off"),
            )
        ),
        ["S3, fresh mount and cache: read-ahead 128 KiB", cell("s3128", s3_size), "-", req("s3128", s3_size)],
        [f"S3, fresh mount and cache: read-ahead {ROOT_READ_AHEAD} KiB (set by root)",
         cell("s34096", s3_size), "-", req("s34096", s3_size)],
    ]
    table = c.table(["cold `dd bs=1M` as the user", "MB/s median (best)", "ratio to at rest (medians)",
                     "FUSE READ requests (mean size)"], rows)
    posix_gain = times["posix128"].median / times["posix4096"].median
    own_gain = times["posix128-off"].median / times["posix128"].median
    s3_gain = times["s3128"].median / times["s34096"].median
    p128, p4096 = mbps(size, times["posix128"].median), mbps(size, times["posix4096"].median)
    p128off = mbps(size, times["posix128-off"].median)
    s128, s4096 = mbps(s3_size, times["s3128"].median), mbps(s3_size, times["s34096"].median)
    conclusion = (
        f"For the user's POSIX mount, 4 MiB read-ahead read {posix_gain:.2f}x as fast as the 128 KiB the "
        f"user gets ({p128:.0f} vs {p4096:.0f} MB/s; at rest {mbps(size, times['native'].median):.0f}); "
        f"for S3 {s3_gain:.2f}x ({s128:.0f} vs {s4096:.0f} MB/s). The daemon's own read-ahead of the "
        f"artifact made the user's 128 KiB POSIX mount {own_gain:.2f}x as fast as without it "
        f"({p128off:.0f} MB/s)."
    )
    conclusion += c.contention_note(load_at_start)
    command = "`.venv/bin/python scripts/bench/bench_user_read.py" + (
        f" {shlex.join(sys.argv[1:])}`" if sys.argv[1:] else "`")
    body = f"""
## Read-ahead of a user's mount (`bench_user_read.py`)

*{c.today()}{' — quick smoke run, not a result' if args.quick else ''}*

**Question.** A user's daemon cannot raise its mount's kernel read-ahead (root's sets 4 MiB):
what does the 128 KiB it keeps cost a cold sequential read of a large POSIX or S3 artifact?

**Command.** {command} (as root: the daemon and every `dd` run as `{args.user}` through
`runuser`; root drops the page cache before each read and, in the 4 MiB arms, writes the
read-ahead into the user's mount). `dd if=FILE of=/dev/null bs=1M`, time as `dd` reports it;
{reps} repetition(s), interleaved; median, best in parentheses. POSIX: one {size_mib} MiB
artifact of random bytes; S3: one {s3_mib} MiB FITS artifact in a moto server (objects in
memory; moto copies the whole object for every ranged GET, which bounds the size under load), a
fresh mount with an empty block cache for every read. Request counts: one more
read per arm under `perf record -e fuse:fuse_request_send`.

**Machine.**
{chr(10).join(facts)}
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
