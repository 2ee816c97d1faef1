"""Reads of remote (S3) artifacts through a butlerfs mount vs boto3, against one moto server.

Starts one ``python -m moto.server`` on 127.0.0.1 (by PID, stopped by PID; objects held in
memory), builds a repository under ``/var/tmp/butlerfs-bench`` whose registry is local and
whose datastore is in that server: one FITS artifact of ``--size-mib`` MiB (random int16
pixels) and ``--readers`` artifacts of ``--part-mib`` MiB of random bytes. Then, all in this
run and each against a baseline measured in the same run:

1. cold sequential read of the big artifact, ``dd bs=1M`` through a fresh mount with a fresh,
   empty cache directory, vs boto3 ``download_fileobj`` of the same object to ``/dev/null``;
2. the same through ``scripts/tcp_proxy.py --delay-ms 20`` (20 ms added to every request);
3. warm: a remount over the now-full block cache (page cache dropped, then warm) vs a local
   copy of the file;
4. ``astropy.io.fits.getheader`` of the big artifact: bytes fetched, as % of the object;
5. ``--readers`` concurrent ``dd`` of different artifacts vs as many concurrent boto3
   downloads (one client per thread);

plus the effect of ``fetch_concurrency`` on (1) and (2). Writes the ``bench:s3`` section of
``docs/BENCHMARKS.md``. Needs root (drop_caches). ``--quick`` is a smoke run: small sizes,
one repetition.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _common as c
import psutil

sys.path.insert(0, str(c.ROOT / "tests"))
from s3server import REGION, MotoServer, TcpProxy, running  # noqa: E402

SECTION = "s3"
BUCKET = "butlerfs-bench"
PREFIX = "bench-s3"
RUN = "bench/s3"
INSTRUMENT = c.INSTRUMENT
BIG = "bigFits"
PART = "part"
STATS_XATTR = "user.butlerfs.stats"
SMALL_KEY = "reference/one-mib"  # outside the datastore: the header table's reference GET
DELAY_MS = 20
# moto keeps an object in a SpooledTemporaryFile of this many bytes before spilling it to
# a file in $TMPDIR; held in memory, drop_caches between reads does not touch the server.
MOTO_ENV = {"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(4 << 30)}


# -- the repository ----------------------------------------------------------------------------


@dataclasses.dataclass
class Repo:
    root: Path
    repo: Path
    big_local: Path
    """A local copy of the big artifact (the warm-read baseline)."""
    uris: dict[str, list[str]]
    """Dataset type -> artifact URIs, by detector."""
    sizes: dict[str, int]
    """URI -> size."""


def write_fits(path: Path, mib: int) -> None:
    """Write an int16 FITS image of ``mib`` MiB of random pixels, one MiB at a time."""
    from astropy.io import fits

    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = 16
    header["NAXIS"] = 2
    header["NAXIS1"] = 8192  # 16 KiB per row
    header["NAXIS2"] = 64 * mib
    header["OBJECT"] = "butlerfs S3 benchmark"
    with open(path, "wb") as stream:
        stream.write(header.tostring().encode())
        c.write_random(stream, mib)
        stream.write(b"\0" * ((-mib * c.MIB) % 2880))


def build_repo(root: Path, big_mib: int, part_mib: int, parts: int) -> Repo:
    """Make a repository at ``root`` (registry local, datastore in the bucket)."""
    from lsst.daf.butler import DataCoordinate, DatasetIdGenEnum, DatasetRef, DatasetType, FileDataset

    from butlerfs.formatter import FileArtifactFormatter

    c.remove_tree(root)
    root.mkdir(parents=True)
    repo = root / "repo"
    butler = c.new_repo(repo, datastore_root=f"s3://{BUCKET}/{PREFIX}/")
    butler.registry.insertDimensionData(
        "detector", *({"instrument": INSTRUMENT, "id": d, "full_name": f"D{d}"} for d in range(parts))
    )
    types = {
        BIG: DatasetType(BIG, ("instrument",), "ButlerfsFile", universe=butler.dimensions),
        PART: DatasetType(PART, ("instrument", "detector"), "ButlerfsFile", universe=butler.dimensions),
    }
    for dataset_type in types.values():
        butler.registry.registerDatasetType(dataset_type)
    butler.registry.registerRun(RUN)

    def ref(name: str, **data_id: int) -> DatasetRef:
        coordinate = DataCoordinate.standardize({"instrument": INSTRUMENT, **data_id},
                                                universe=butler.dimensions)
        return DatasetRef(types[name], coordinate, run=RUN,
                          id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN)

    big_local = root / "big-local.fits"
    write_fits(big_local, big_mib)
    big_ref = ref(BIG)
    butler.ingest(FileDataset(path=str(big_local), refs=[big_ref], formatter=FileArtifactFormatter),
                  transfer="copy")
    part_refs = []
    for detector in range(parts):
        staged = root / f"part{detector}.bin"
        with open(staged, "wb") as stream:
            c.write_random(stream, part_mib)
        part_refs.append(ref(PART, detector=detector))
        butler.ingest(FileDataset(path=str(staged), refs=[part_refs[-1]], formatter=FileArtifactFormatter),
                      transfer="move")
    uris = {BIG: [str(butler.getURI(big_ref))], PART: [str(butler.getURI(r)) for r in part_refs]}
    butler.close()
    sizes = {BIG: big_local.stat().st_size, PART: part_mib * c.MIB}
    return Repo(root, repo, big_local, uris, {u: sizes[t] for t, us in uris.items() for u in us})


def split(uri: str) -> tuple[str, str]:
    from butlerfs.remote import split_s3_uri

    _, bucket, key = split_s3_uri(uri)
    return bucket, key


# -- measuring ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """One timed read (or set of concurrent reads)."""

    seconds: float
    nbytes: int
    requests: int = 0
    fetched: int = 0
    client_cpu: float = 0.0
    """The daemon's CPU seconds (mount) or this process's (boto3)."""
    server_cpu: float = 0.0
    proxy_cpu: float = 0.0

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6


class Runs(list[Run]):
    def med(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self)

    @property
    def seconds(self) -> float:
        return self.med("seconds")

    def mbps(self) -> str:
        """``median (best)`` MB/s."""
        return f"{self.nbytes / self.seconds / 1e6:.0f} ({max(r.mbps for r in self):.0f})"

    @property
    def nbytes(self) -> int:
        return self[0].nbytes


def cpu(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return times.user + times.system


class Meter:
    """CPU of the processes involved, and the mount's counters, around one measurement."""

    def __init__(self, client: psutil.Process, server: psutil.Process, proxy: psutil.Process | None,
                 mountpoint: str | None = None) -> None:
        self.procs = (client, server, proxy)
        self.mountpoint = mountpoint

    def _now(self) -> tuple[float, ...]:
        stats = mount_stats(self.mountpoint) if self.mountpoint else {}
        return (*(cpu(p) for p in self.procs), stats.get("requests", 0), stats.get("bytes_fetched", 0))

    @contextlib.contextmanager
    def measure(self, nbytes: int, requests: Callable[[], int] | None = None) -> Iterator[list[Run]]:
        box: list[Run] = []
        before = self._now()
        counted = requests() if requests else 0
        start = time.perf_counter()
        yield box
        elapsed = time.perf_counter() - start
        after = self._now()
        diff = [a - b for a, b in zip(after, before, strict=True)]
        box.append(Run(elapsed, nbytes, int(diff[3]) or (requests() - counted if requests else 0),
                       int(diff[4]), diff[0], diff[1], diff[2]))


def mount_stats(mountpoint: str) -> dict[str, int]:
    return json.loads(os.getxattr(mountpoint, STATS_XATTR))


def settled_stats(mountpoint: str, quiet: float = 0.5) -> dict[str, int]:
    """The counters once no fetch has changed them for ``quiet`` seconds."""
    stats = mount_stats(mountpoint)
    for _ in range(40):
        time.sleep(quiet)
        again = mount_stats(mountpoint)
        if again == stats:
            break
        stats = again
    return stats


def dd_command(path: str) -> list[str]:
    return ["dd", f"if={path}", "of=/dev/null", "bs=1M"]


def dd(paths: list[str]) -> None:
    """``dd bs=1M`` of every path at the same time; wait for all."""
    procs = [subprocess.Popen(dd_command(p), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for p in paths]
    for proc, path in zip(procs, paths, strict=True):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"dd of {path} failed: {err.decode()[-500:]}")


class Boto3:
    """boto3 clients of one endpoint (default config), counting the HTTP requests they send."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self.sent = 0

    def _count(self, **_: object) -> None:
        with self._lock:
            self.sent += 1

    def client(self):
        import boto3

        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"], region_name=REGION,
        )
        client.meta.events.register("before-send.s3", self._count)
        return client

    def download(self, clients: list[Any], uris: list[str]) -> None:
        """``download_fileobj`` of each URI to /dev/null, a thread and client each, default TransferConfig."""

        def one(pair: tuple[Any, str]) -> None:
            client, uri = pair
            bucket, key = split(uri)
            with open(os.devnull, "wb") as sink:
                client.download_fileobj(bucket, key, sink)

        if len(uris) == 1:
            one((clients[0], uris[0]))
            return
        with concurrent.futures.ThreadPoolExecutor(len(uris)) as pool:
            list(pool.map(one, zip(clients, uris, strict=True)))


# -- the benchmark -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, repo: Repo, server: MotoServer, proxy: TcpProxy) -> None:
        self.args = args
        self.repo = repo
        self.server = server
        self.proxy = proxy
        self.server_proc = psutil.Process(server.process.pid)
        self.proxy_proc = psutil.Process(proxy.process.pid)
        self.me = psutil.Process()
        self.mountpoint = c.BENCH_DIR / "mnt-s3"
        self.caches = repo.root / "caches"
        self.log = repo.root / "daemon.log"
        self.mounts = 0

    def endpoint(self, proxied: bool) -> str:
        return self.proxy.endpoint if proxied else self.server.endpoint

    def cache_dir(self, fresh: bool = True) -> Path:
        path = self.caches / "current"
        if fresh:
            c.remove_tree(path)
        return path

    @contextlib.contextmanager
    def mounted(self, dataset_type: str, proxied: bool, cache: Path, **kwargs: Any):
        """Mount (the daemon talking to the server or to the proxy); yield (mount, files, meter)."""
        import butlerfs

        saved = os.environ["S3_ENDPOINT_URL"]
        os.environ["S3_ENDPOINT_URL"] = self.endpoint(proxied)
        c.fresh_dir(self.mountpoint)
        try:
            with butlerfs.mount(str(self.repo.repo), str(self.mountpoint), collections=[RUN],
                                dataset_types=[dataset_type], cache_dir=str(cache), log_file=str(self.log),
                                **kwargs) as m:
                self.mounts += 1
                files = sorted(
                    os.path.join(parent, name)
                    for parent, _, names in os.walk(Path(m.mountpoint, dataset_type)) for name in names
                )
                meter = Meter(psutil.Process(m.pid), self.server_proc, self.proxy_proc if proxied else None,
                              m.mountpoint)
                yield m, files, meter
        finally:
            os.environ["S3_ENDPOINT_URL"] = saved

    def mount_cold(self, dataset_type: str, proxied: bool, **kwargs: Any) -> Run:
        """Fresh cache, fresh mount, dropped page cache: ``dd`` every artifact of the type at once."""
        uris = self.repo.uris[dataset_type]
        total = sum(self.repo.sizes[u] for u in uris)
        with self.mounted(dataset_type, proxied, self.cache_dir(), **kwargs) as (_, files, meter):
            assert len(files) == len(uris), files
            c.drop_caches()
            with meter.measure(total) as box:
                dd(files)
            stats = mount_stats(str(self.mountpoint))
        if stats["bytes_fetched"] != total:
            raise RuntimeError(f"the mount fetched {stats['bytes_fetched']} bytes, not {total}: {stats}")
        return box[0]

    def boto3_cold(self, dataset_type: str, proxied: bool) -> Run:
        uris = self.repo.uris[dataset_type]
        total = sum(self.repo.sizes[u] for u in uris)
        downloader = Boto3(self.endpoint(proxied))
        clients = [downloader.client() for _ in uris]  # not timed; creating clients is not thread-safe
        meter = Meter(self.me, self.server_proc, self.proxy_proc if proxied else None)
        c.drop_caches()
        with meter.measure(total, lambda: downloader.sent) as box:
            downloader.download(clients, uris)
        return box[0]

    def pair(self, dataset_type: str, proxied: bool, reps: int, **kwargs: Any) -> tuple[Runs, Runs]:
        """``reps`` x (mount, boto3), the order alternating."""
        mount, base = Runs(), Runs()
        for rep in range(reps):
            if rep % 2:
                mount.append(self.mount_cold(dataset_type, proxied, **kwargs))
                base.append(self.boto3_cold(dataset_type, proxied))
            else:
                base.append(self.boto3_cold(dataset_type, proxied))
                mount.append(self.mount_cold(dataset_type, proxied, **kwargs))
            say(f"  rep {rep + 1}: mount {mount[-1].mbps:.0f} MB/s ({mount[-1].requests} GETs, daemon "
                f"{mount[-1].client_cpu:.1f} s CPU, moto {mount[-1].server_cpu:.1f} s), boto3 "
                f"{base[-1].mbps:.0f} MB/s ({base[-1].requests} requests, moto {base[-1].server_cpu:.1f} s)")
        return mount, base

    def warm(self, reps: int) -> dict[str, tuple[Runs, Runs]]:
        """Remounts over a full cache vs the local copy; needs the cache of a complete cold read."""
        size = self.repo.sizes[self.repo.uris[BIG][0]]
        local = str(self.repo.big_local)
        cache = self.cache_dir(fresh=False)
        rows = {k: (Runs(), Runs()) for k in ("disk", "files", "kernel")}
        me = Meter(self.me, self.server_proc, None)
        for _ in range(reps):
            c.drop_caches()
            with me.measure(size) as box:
                dd([local])
            rows["disk"][1].append(box[0])
            with self.mounted(BIG, False, cache) as (_, files, meter):
                c.drop_caches()
                with meter.measure(size) as box:
                    dd(files)
                rows["disk"][0].append(box[0])
            # The block files are in the page cache now; a new mount has no file pages.
            with self.mounted(BIG, False, cache) as (_, files, meter):
                with meter.measure(size) as box:
                    dd(files)
                rows["files"][0].append(box[0])
                with meter.measure(size) as box:
                    dd(files)
                rows["kernel"][0].append(box[0])
                stats = mount_stats(str(self.mountpoint))
            if stats["requests"]:
                raise RuntimeError(f"a warm read sent GETs: {stats}")
            dd([local])  # untimed: the local copy into the page cache, like the block files
            for key in ("files", "kernel"):
                with me.measure(size) as box:
                    dd([local])
                rows[key][1].append(box[0])
            say(f"  warm: disk {rows['disk'][0][-1].mbps:.0f} vs {rows['disk'][1][-1].mbps:.0f} MB/s, "
                f"files {rows['files'][0][-1].mbps:.0f} vs {rows['files'][1][-1].mbps:.0f}, kernel "
                f"{rows['kernel'][0][-1].mbps:.0f} vs {rows['kernel'][1][-1].mbps:.0f}")
        return rows

    def header(self, reps: int) -> tuple[Runs, Runs, Runs]:
        """``fits.getheader`` through fresh mounts.

        For reference, boto3 GETs of the first 2880 bytes of the same object and of a 1 MiB
        object: what one GET costs the server, whatever its range.
        """
        from astropy.io import fits

        uri = self.repo.uris[BIG][0]
        mount, base, small = Runs(), Runs(), Runs()
        downloader = Boto3(self.server.endpoint)
        client = downloader.client()
        bucket, key = split(uri)
        client.put_object(Bucket=bucket, Key=SMALL_KEY, Body=os.urandom(c.MIB))
        for _ in range(reps):
            with self.mounted(BIG, False, self.cache_dir()) as (_, files, meter):
                c.drop_caches()
                with meter.measure(2880) as box:
                    header = fits.getheader(files[0])
                if header["OBJECT"] != "butlerfs S3 benchmark":
                    raise RuntimeError(f"wrong header: {header!r}")
                stats = settled_stats(str(self.mountpoint))  # read-ahead still in flight counts
                run = box[0]
                run.requests, run.fetched = stats["requests"], stats["bytes_fetched"]
                mount.append(run)
            with Meter(self.me, self.server_proc, None).measure(2880, lambda: downloader.sent) as box:
                client.get_object(Bucket=bucket, Key=key, Range="bytes=0-2879")["Body"].read()
            base.append(box[0])
            with Meter(self.me, self.server_proc, None).measure(2880, lambda: downloader.sent) as box:
                client.get_object(Bucket=bucket, Key=SMALL_KEY, Range="bytes=0-2879")["Body"].read()
            small.append(box[0])
            say(f"  header: {run.fetched} bytes in {run.requests} GETs, {run.seconds * 1e3:.0f} ms")
        return mount, base, small


def say(text: str) -> None:
    print(text, flush=True)


@dataclasses.dataclass
class Results:
    args: argparse.Namespace
    big_mib: int
    part_mib: int
    reps: int
    side_reps: int
    big_size: int
    build_s: float
    default_fc: int
    direct: tuple[Runs, Runs]
    proxied: tuple[Runs, Runs]
    warm: dict[str, tuple[Runs, Runs]]
    header: tuple[Runs, Runs, Runs]
    multi: tuple[Runs, Runs]
    variants: dict[tuple[int, bool], tuple[Runs, Runs]]
    mounts: int
    server_rss: int
    load_before: str
    elapsed: float = 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=None,
                        help="big artifact (default 256; 32 with --quick)")
    parser.add_argument("--part-mib", type=int, default=None,
                        help="each concurrent reader's artifact (default 64; 8 with --quick)")
    parser.add_argument("--readers", type=int, default=8, help="concurrent readers (default 8)")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions of (1), (2), (3) and (5) (default 5; 1 with --quick)")
    parser.add_argument("--side-reps", type=int, default=None,
                        help="repetitions of (4) and each fetch_concurrency (default 3; 1 with --quick)")
    parser.add_argument("--concurrency", default="4,32",
                        help="fetch_concurrency values besides the default (default 4,32)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to this long for the 1-minute load average to fall below 1")
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one repetition")
    parser.add_argument("--keep", action="store_true", help="keep the repository (default: delete it)")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    big_mib = args.size_mib or (32 if args.quick else 256)
    part_mib = args.part_mib or (8 if args.quick else 64)
    reps = args.reps or (1 if args.quick else 5)
    side_reps = args.side_reps or (1 if args.quick else 3)
    concurrencies = [int(x) for x in args.concurrency.split(",") if x]
    c.require_root_for_cold()
    c.wait_for_quiet(args.wait_idle)
    from butlerfs.mounting import MountOptions

    default_fc = MountOptions("", "", []).fetch_concurrency
    started = time.perf_counter()
    load_before = c.load_average()
    root = c.BENCH_DIR / "s3"
    server = MotoServer(env=MOTO_ENV)
    proxy: TcpProxy | None = None
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(name, None)
    try:
        server.start()
        os.environ.update(server.environ())
        proxy = TcpProxy(server.port, "--delay-ms", str(DELAY_MS)).start()
        with running(server, proxy):
            server.client().create_bucket(Bucket=BUCKET)
            say(f"moto server PID {server.process.pid} on {server.endpoint}; "
                f"proxy PID {proxy.process.pid} on {proxy.endpoint} (+{DELAY_MS} ms)")
            t0 = time.perf_counter()
            say(f"Building the repository: one {big_mib} MiB FITS, {args.readers} x {part_mib} MiB, "
                f"under {root} ...")
            repo = build_repo(root, big_mib, part_mib, args.readers)
            build_s = time.perf_counter() - t0
            bench = Bench(args, repo, server, proxy)
            say(f"1. Cold sequential read, direct ({reps} reps) ...")
            direct = bench.pair(BIG, False, reps)
            say("3. Warm reads over the full cache ...")
            warm = bench.warm(reps)
            say(f"2. Cold sequential read through the proxy (+{DELAY_MS} ms) ...")
            proxied = bench.pair(BIG, True, reps)
            say("4. FITS header ...")
            header = bench.header(side_reps)
            say(f"5. {args.readers} concurrent readers ...")
            multi = bench.pair(PART, False, reps)
            variants: dict[tuple[int, bool], tuple[Runs, Runs]] = {}
            for fc in concurrencies:
                for via in (False, True):
                    say(f"fetch_concurrency={fc}, {'proxy' if via else 'direct'} ...")
                    variants[fc, via] = bench.pair(BIG, via, side_reps, fetch_concurrency=fc)
            big_size = repo.sizes[repo.uris[BIG][0]]
            results = Results(args, big_mib, part_mib, reps, side_reps, big_size, build_s, default_fc, direct,
                              proxied, warm, header, multi, variants, bench.mounts, server_mem(server),
                              load_before)
    finally:
        server.stop()
        if proxy is not None:
            proxy.stop()
        if not args.keep:
            c.remove_tree(root)
        with contextlib.suppress(OSError):
            (c.BENCH_DIR / "mnt-s3").rmdir()
    results.elapsed = time.perf_counter() - started
    body, tables = report(results)
    c.publish(SECTION, body, args.no_docs)
    print("\n\n".join(tables))
    return 0


def server_mem(server: MotoServer) -> int:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(server.process.pid).memory_info().rss
    return 0


def ratio(mount: Runs, base: Runs) -> float:
    """Throughput of the mount over the baseline's (medians)."""
    return base.seconds / mount.seconds


def cpu_cell(runs: Runs, attr: str) -> str:
    """CPU seconds per read, and as a share of the read's wall time (medians)."""
    return f"{runs.med(attr):.2f} s ({100 * runs.med(attr) / runs.seconds:.0f}%)"


def verdict(value: float, target: float, more: bool = True) -> str:
    ok = value >= target if more else value <= target
    return f"{'meets' if ok else 'misses'} the target {'>=' if more else '<='} {target:g}"


def report(r: Results) -> tuple[str, list[str]]:
    args, fc0 = r.args, r.default_fc

    def cold_rows(label: str, pair: tuple[Runs, Runs], proxy: bool) -> list[list[str]]:
        mount, base = pair
        rows = []
        for who, runs in ((f"mount (`dd bs=1M`), fetch_concurrency {fc0}", mount),
                          ("boto3 `download_fileobj`", base)):
            rows.append([label, who, runs.mbps(), c.ratio(ratio(mount, base)) if runs is mount else "",
                         f"{runs.med('requests'):.0f}", cpu_cell(runs, "client_cpu"),
                         cpu_cell(runs, "server_cpu"),
                         cpu_cell(runs, "proxy_cpu") if proxy else "-"])
        return rows

    cpu_head = ["client CPU (daemon / boto3 process), % of wall", "moto CPU, % of wall"]
    cold_table = c.table(
        ["endpoint", "reader", "MB/s median (best)", "ratio mount/boto3", "HTTP requests", *cpu_head,
         "proxy CPU, % of wall"],
        cold_rows("moto, direct", r.direct, False)
        + cold_rows(f"moto + {DELAY_MS} ms per request", r.proxied, True),
    )
    warm_labels = {
        "disk": "remount, page cache dropped (block files read from disk; local copy from disk)",
        "files": "remount, block files in the page cache (local copy in the page cache)",
        "kernel": "second read in the same mount: the kernel's page cache of the mount's file (local copy "
                  "in the page cache)",
    }
    warm_table = c.table(
        ["case", "local copy MB/s median (best)", "mount MB/s median (best)", "ratio mount/local",
         "daemon CPU, % of wall"],
        [[label, r.warm[key][1].mbps(), r.warm[key][0].mbps(), c.ratio(ratio(*r.warm[key])),
          cpu_cell(r.warm[key][0], "client_cpu")] for key, label in warm_labels.items()],
    )
    hmount, hbase, hsmall = r.header
    fetched = hmount.med("fetched")
    pct = 100 * fetched / r.big_size
    header_table = c.table(
        ["artifact", "bytes fetched (median)", "% of the object", "GETs", "`getheader` time median (best)",
         "reference: boto3 GET of bytes 0-2879 of this object", "of a 1 MiB object"],
        [[f"{r.big_size / c.MIB:.1f} MiB FITS", f"{fetched:,.0f}", f"{pct:.2f} %",
          f"{hmount.med('requests'):.0f}",
          f"{c.seconds(hmount.seconds)} ({c.seconds(min(x.seconds for x in hmount))})",
          c.seconds(hbase.seconds), c.seconds(hsmall.seconds)]],
    )
    mmount, mbase = r.multi
    multi_table = c.table(
        ["reader", "aggregate MB/s median (best)", "ratio mount/boto3", "HTTP requests", *cpu_head],
        [[f"{args.readers} x `dd bs=1M` through the mount", mmount.mbps(), c.ratio(ratio(mmount, mbase)),
          f"{mmount.med('requests'):.0f}", cpu_cell(mmount, "client_cpu"), cpu_cell(mmount, "server_cpu")],
         [f"{args.readers} threads x boto3 `download_fileobj` (one client each)", mbase.mbps(), "",
          f"{mbase.med('requests'):.0f}", cpu_cell(mbase, "client_cpu"), cpu_cell(mbase, "server_cpu")]],
    )
    var_rows = []
    for fc in sorted({*(fc for fc, _ in r.variants), fc0}):
        row = [f"{fc} (default)" if fc == fc0 else str(fc)]
        for via, main in ((False, r.direct), (True, r.proxied)):
            mount, base = main if fc == fc0 else r.variants[fc, via]
            row += [mount.mbps(), c.ratio(ratio(mount, base)), f"{mount.med('requests'):.0f}",
                    cpu_cell(mount, "server_cpu")]
        var_rows.append(row)
    var_table = c.table(
        ["fetch_concurrency", "direct: mount MB/s median (best)", "ratio to boto3", "GETs", "moto CPU",
         f"+{DELAY_MS} ms: mount MB/s median (best)", "ratio to boto3", "GETs", "moto CPU"], var_rows)

    command = "`.venv/bin/python scripts/bench/bench_s3.py" + (f" {shlex.join(sys.argv[1:])}`"
                                                               if sys.argv[1:] else "`")
    body = f"""
## Remote (S3) artifacts vs boto3 (`bench_s3.py`)

*{c.today()}{' — quick smoke run, not a result' if args.quick else ''}*

**Question.** How close do reads of artifacts in an S3 datastore through the mount come to
boto3 downloading the same objects from the same endpoint? (1) cold sequential read of a
{r.big_mib} MiB artifact, target mount/boto3 >= 0.9; (2) the same with {DELAY_MS} ms added to every
request, target >= 0.9; (3) a remount over the full block cache vs a local copy, target >= 0.9;
(4) reading a FITS header, target <= 1% of the object fetched; (5) {args.readers} concurrent readers
of {args.readers} artifacts of {r.part_mib} MiB vs {args.readers} concurrent boto3 downloads, target >= 0.8.

**Command.** {command} (run as root). One `python -m moto.server` process on 127.0.0.1 serves
everything (moto {pkg('moto')}; objects held in memory, `MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=4 GiB`, so
that dropping the page cache does not touch the server's data), and for (2) one `scripts/tcp_proxy.py
--delay-ms {DELAY_MS}` in front of it; both started and stopped by PID. The repository's registry is a
local SQLite file, its datastore `s3://{BUCKET}/{PREFIX}/` (built in {r.build_s:.0f} s: a FITS image of
random int16 pixels, {r.big_size:,} bytes, and {args.readers} files of random bytes, ingested with
`butlerfs.formatter.FileArtifactFormatter`). Mount reads are `dd if=FILE of=/dev/null bs=1M`, timed as
a whole command from outside (for (5), {args.readers} `dd` started together, timed until the last
exits), each through a new `butlerfs.mount()` (default options unless stated: fetch_concurrency
{fc0}; the fetch plan of docs/SEMANTICS.md) with a new, empty cache
directory, after `sync; echo 3 > /proc/sys/vm/drop_caches`; every cold read fetched exactly the
artifacts' bytes (the root's `user.butlerfs.stats`). Baseline: boto3 {pkg('boto3')} (s3transfer
{pkg('s3transfer')}, no awscrt) `client.download_fileobj(bucket, key, open('/dev/null', 'wb'))` in
this process, default client config and default `TransferConfig` (8 MiB parts above 8 MiB,
max_concurrency 10), after drop_caches too; for (5) one thread and one client per object. Mount
and boto3 reads alternate, the order swapped every repetition: {r.reps} repetitions of (1), (2), (3) and (5),
{r.side_reps} of the others; median, best in parentheses. MB/s is 10^6 bytes per second of wall time.
CPU is user+system seconds per read (psutil) of the daemon or of this Python process (boto3), of the
moto server and of the proxy, and as a share of the read's wall time (100% = one core busy
throughout). HTTP requests: the daemon's GETs (stats xattr), or every request boto3 sent (a HEAD
per object included). {r.mounts} mounts in all.

**Machine.**
{chr(10).join(c.machine_facts(c.BENCH_DIR))}
{c.load_line(r.load_before)}
- moto server's resident memory at the end: {r.server_rss / c.MIB:.0f} MiB

Cold sequential read, (1) and (2):

{cold_table}

(3) Warm reads over the block cache that the last cold read of (1) filled (no GETs; the same
conditions for the local copy, which sits on the same disk as the cache):

{warm_table}

(4) `astropy.io.fits.getheader(path)` through a fresh mount with a fresh cache, page cache dropped;
bytes fetched from the stats xattr once no fetch has changed them for 0.5 s (read-ahead included).
The reference columns time one boto3 ranged GET of 2880 bytes:

{header_table}

(5) {args.readers} concurrent readers of {args.readers} different artifacts of {r.part_mib} MiB:

{multi_table}

Effect of `fetch_concurrency` on (1) and (2), {r.side_reps} repetitions each (ratios to the boto3 reads
measured alongside; the default's row repeats the tables above):

{var_table}

**Conclusion.** {conclusion(r, pct)}
Total benchmark time {r.elapsed:.0f} s.
"""
    return body, [cold_table, warm_table, header_table, multi_table, var_table]


def conclusion(r: Results, pct: float) -> str:
    """The verdicts, and what limits each number, from the measurements."""
    if r.args.quick:
        return "Smoke run: sizes too small to conclude anything."
    dm, db = r.direct
    pm, pb = r.proxied
    mm, mb = r.multi
    hmount, hbase, hsmall = r.header
    r1, r2, r5 = ratio(dm, db), ratio(pm, pb), ratio(mm, mb)
    r3 = {k: ratio(*v) for k, v in r.warm.items()}
    min_gets = -(-r.big_size // (8 * c.MIB))
    min_parts = r.args.readers * -(-r.part_mib // 8)
    disk_mount, disk_local = r.warm["disk"]
    files_mount = r.warm["files"][0]

    def mbps(runs: Runs) -> str:
        return f"{runs.nbytes / runs.seconds / 1e6:.0f}"

    disk_vs_files = (
        "close to its speed without any disk reads, so the FUSE path rather than the disk sets it"
        if disk_mount.seconds <= 1.5 * files_mount.seconds
        else "below its speed without disk reads: each 1 MiB block file is read from disk only when its "
        "FUSE request arrives, a few at a time"
    )

    def busy(runs: Runs, attr: str = "server_cpu") -> str:
        return f"{100 * runs.med(attr) / runs.seconds:.0f}%"

    def per_get(runs: Runs) -> str:
        return f"{1e3 * runs.med('server_cpu') / runs.med('requests'):.0f} ms"

    def slower(mount: Runs, base: Runs) -> str:
        return f"{100 * (mount.seconds / base.seconds - 1):+.0f}%"

    share = min(dm.med("server_cpu") / dm.seconds, db.med("server_cpu") / db.seconds)
    starved = "" if share >= 0.8 else (
        "; well below a core here: with other work on the machine, the server often waited for a core"
    )
    extra = dm.med("requests") - min_gets + mm.med("requests") - min_parts
    why_extra = (
        "The extra GETs are the read-ahead's first, small ones (the first read's block, then the "
        "growing window's first parts), relatively more of them for smaller artifacts."
        if extra > 2 else "The mount's GETs are no more than whole 8 MiB parts would be."
    )
    text = [
        f"(1) {r1:.2f}, {verdict(r1, 0.9)}; (2) {r2:.2f}, {verdict(r2, 0.9)}; (3) {r3['disk']:.2f} with "
        f"the block files on disk, {verdict(r3['disk'], 0.9)}, and {r3['files']:.2f} with them in the page "
        f"cache, {verdict(r3['files'], 0.9)}; (4) {pct:.2f} % of the object, "
        f"{verdict(pct, 1.0, more=False)}; (5) {r5:.2f}, {verdict(r5, 0.8)}.",
        #
        f"*What limits (1), (2) and (5): the moto server's CPU, per GET.* moto was busy {busy(dm)} of the "
        f"wall time of the mount's cold reads in (1) and {busy(db)} of boto3's (one Python process: about "
        f"one core at most{starved}), while the daemon used {busy(dm, 'client_cpu')} of a core and the "
        f"boto3 process {busy(db, 'client_cpu')}. moto answers every GET, ranged or not, by copying the "
        f"whole object out "
        f"of its buffer (`FakeKey.value`) and slicing the range from the copy, so a GET costs it about "
        f"the same whatever its size: {c.seconds(hbase.seconds)} for 2880 bytes of the {r.big_mib} MiB "
        f"object against {c.seconds(hsmall.seconds)} from a 1 MiB object (table 4), and {per_get(dm)} of "
        f"moto CPU per GET in (1) ({per_get(db)} per boto3 request). The server's work grows with the "
        f"number of GETs, not with the bytes: the mount sent {dm.med('requests'):.0f} GETs for the "
        f"{r.big_mib} MiB artifact where boto3 sent {db.med('requests') - 1:.0f} and a HEAD ({min_gets} "
        f"aligned 8 MiB parts would do), and {mm.med('requests'):.0f} GETs in (5) where boto3 sent "
        f"{mb.med('requests') - r.args.readers:.0f} and {r.args.readers} HEADs ({min_parts} parts would "
        f"do); moto's CPU per read: {dm.med('server_cpu'):.1f} s for the mount against "
        f"{db.med('server_cpu'):.1f} s for boto3 in (1), {mm.med('server_cpu'):.1f} s against "
        f"{mb.med('server_cpu'):.1f} s in (5). {why_extra} A real S3 endpoint charges a GET mostly "
        f"latency and bytes, not the object's size, so moto exaggerates the cost of each extra GET. Two "
        f"cores are shared by the server, the daemon or boto3, `dd`, the proxy and other work on the "
        f"machine (load average above): single repetitions vary by 10-20%, see the best values. "
        f"{concurrency_note(r)}",
        #
        f"*(2):* with {DELAY_MS} ms per request the mount's read time changed by {slower(pm, dm)} and "
        f"boto3's by {slower(pb, db)} (medians of noisy runs); the proxy used {busy(pm, 'proxy_cpu')} of a "
        f"core. "
        f"With {r.default_fc} (mount) or 10 (boto3) requests in flight the delay hides behind the server's "
        f"time per GET, except at the start of the mount's read, where the read-ahead window grows only "
        f"as the kernel's reads arrive and these wait for the first GETs.",
        #
        f"*(3):* from disk, the mount read {mbps(disk_mount)} MB/s, {disk_vs_files} ({mbps(files_mount)} "
        f"MB/s with the block files in the page cache); the local copy's cold reads ranged from "
        f"{min(x.mbps for x in disk_local):.0f} to {max(x.mbps for x in disk_local):.0f} MB/s (other work "
        f"shared the disk). With everything in the page cache, the local read is one copy in the kernel, "
        f"while a read through the mount is a FUSE round trip per 1 MiB, answered by the daemon from one "
        f"block file each (open, fstat, pread, close; the daemon {busy(files_mount, 'client_cpu')} busy): "
        f"that path, not the fetcher, bounds the ratio, "
        f"as it bounds any FUSE read (`bench_read.py`). The last row is the kernel's own cache of the "
        f"mount's file, with no daemon work at all, and still below the local file's speed.",
        #
        f"*(4):* `getheader` read the first block only ({hmount.med('requests'):.0f} GET); its time is "
        f"that GET's on this server ({c.seconds(hmount.seconds)}, against {c.seconds(hbase.seconds)} for "
        f"boto3's GET of the same object).",
    ]
    return "\n\n".join(text)


def concurrency_note(r: Results) -> str:
    """What the fetch_concurrency table shows."""
    found: dict[int, tuple[float, float]] = {}
    for fc in {*(fc for fc, _ in r.variants), r.default_fc}:
        pairs = [r.direct, r.proxied] if fc == r.default_fc else [r.variants[fc, False], r.variants[fc, True]]
        found[fc] = (ratio(*pairs[0]), ratio(*pairs[1]))
    spread = max(max(v) - min(v) for v in zip(*found.values(), strict=True))
    best = max(found, key=lambda fc: sum(found[fc]))
    if spread < 0.15:
        return (f"`fetch_concurrency` from {min(found)} to {max(found)} (last table) moves the ratios by "
                f"{spread:.2f} at most, within that noise: one server core, not the number of requests in "
                f"flight, sets the pace.")
    return (f"`fetch_concurrency` (last table) moves the ratios by up to {spread:.2f}; {best} did best "
            f"here, but with this noise only a difference well above 0.15 means much.")


def pkg(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
