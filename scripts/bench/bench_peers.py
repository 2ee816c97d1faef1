"""butlerfs against s3fs and rclone mounting the same bucket, shape by shape, on two S3 servers.

Two servers, each built from scratch and started and stopped by PID:

- ``s3like``: ``scripts/s3_file_server.py`` (objects are files, a GET costs a constant plus
  its bytes, as on S3) behind ``scripts/tcp_proxy.py --delay-ms 20 --bandwidth-mbps 100``
  (first-byte latency per request, bandwidth per connection);
- ``moto``: ``python -m moto.server`` (every GET copies the whole object) behind a proxy
  that only counts.

Every client talks to the proxy, whose counters give the requests and bytes each read
cost. The bucket holds a Butler datastore (registry local): a 256 MiB FITS image, 8
artifacts of 64 MiB and 1000 small FITS files. butlerfs mounts the repository; s3fs and
rclone mount the bucket and read the same objects by key. Each tool runs with its
defaults and with its best cache option; boto3 and a local copy of the file are the
baselines. Shapes: cold sequential read, FITS header reads (dd, Python, astropy,
fitsheader), warm re-read, remount over the cache, 200 random 256 KiB reads (fio),
8 concurrent readers, ``find`` over 1000 small objects, first byte of a 1-byte read.
Writes the ``bench:peers`` section of ``docs/BENCHMARKS.md`` and ``docs/bench_peers.png``.
Needs root (drop_caches).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _common as c

sys.path.insert(0, str(c.ROOT / "tests"))
from s3server import ACCESS_KEY, REGION, SECRET_KEY, FileS3Server, MotoServer, TcpProxy, running  # noqa: E402

SECTION = "peers"
PLOT = c.ROOT / "docs" / "bench_peers.png"
BUCKET = "bench-peers"
RUN = "bench/peers"
BIG, PART, SMALL = "bigFits", "part", "small"
STATS_XATTR = "user.butlerfs.stats"
MOTO_ENV = {"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(4 << 30)}  # objects in memory, not in $TMPDIR
FITS_OBJECT = "butlerfs peers benchmark"

SHAPES = {
    "cold": "cold sequential read, `dd bs=1M`",
    "hdr_dd": "header: `dd bs=2880 count=1`",
    "hdr_py": "header: Python `open().read(2880)`",
    "hdr_astropy": "header: `astropy.io.fits.getheader`",
    "hdr_fitsheader": "header: `fitsheader`",
    "warm": "warm re-read, same mount",
    "remount": "remount over the cache, page cache dropped",
    "random": "200 random 256 KiB reads (fio)",
    "multi": "8 concurrent readers of 8 objects",
    "find": "`find` + stat of 1000 small objects",
    "ttfb": "first byte of a 1-byte read",
}
HEADERS = ("hdr_dd", "hdr_py", "hdr_astropy", "hdr_fitsheader")
GROUPS = ("seq", "header", "random", "multi", "find", "ttfb")
THROUGHPUT = ("cold", "warm", "remount", "random", "multi")  # MB/s; the others are times


# -- the bucket and the repository ---------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """What the bucket holds, by object key, and the local copy of the big file."""

    repo: Path
    big_key: str
    part_keys: list[str]
    small_prefix: str
    """The "directory" of the 1000 small objects (a key prefix ending in ``/``)."""
    small_count: int
    sizes: dict[str, int]
    big_local: Path


def write_fits(path: Path, mib: int) -> None:
    """An int16 FITS image of ``mib`` MiB of random pixels."""
    from astropy.io import fits

    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = 16
    header["NAXIS"] = 2
    header["NAXIS1"] = 8192
    header["NAXIS2"] = 64 * mib
    header["OBJECT"] = FITS_OBJECT
    with open(path, "wb") as stream:
        stream.write(header.tostring().encode())
        c.write_random(stream, mib)
        stream.write(b"\0" * ((-mib * c.MIB) % 2880))


def build(root: Path, prefix: str, big_mib: int, part_mib: int, parts: int, smalls: int) -> Data:
    """Make a repository whose datastore is ``s3://BUCKET/prefix/`` (the endpoint from the environment)."""
    from astropy.io import fits
    from lsst.daf.butler import DataCoordinate, DatasetIdGenEnum, DatasetRef, DatasetType, FileDataset

    from butlerfs.formatter import FileArtifactFormatter
    from butlerfs.remote import split_s3_uri

    c.remove_tree(root)
    root.mkdir(parents=True)
    repo = root / "repo"
    butler = c.new_repo(repo, datastore_root=f"s3://{BUCKET}/{prefix}/")
    butler.registry.insertDimensionData(
        "detector", *({"instrument": c.INSTRUMENT, "id": d, "full_name": f"D{d}"} for d in range(smalls))
    )
    types = {
        BIG: DatasetType(BIG, ("instrument",), "ButlerfsFile", universe=butler.dimensions),
        PART: DatasetType(PART, ("instrument", "detector"), "ButlerfsFile", universe=butler.dimensions),
        SMALL: DatasetType(SMALL, ("instrument", "detector"), "ButlerfsFile", universe=butler.dimensions),
    }
    for dataset_type in types.values():
        butler.registry.registerDatasetType(dataset_type)
    butler.registry.registerRun(RUN)

    def ref(name: str, **data_id: int) -> DatasetRef:
        coordinate = DataCoordinate.standardize(
            {"instrument": c.INSTRUMENT, **data_id}, universe=butler.dimensions
        )
        return DatasetRef(
            types[name], coordinate, run=RUN, id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN
        )

    big_local = root / "big-local.fits"
    write_fits(big_local, big_mib)
    datasets = [FileDataset(path=str(big_local), refs=[ref(BIG)], formatter=FileArtifactFormatter)]
    for detector in range(parts):
        staged = root / f"part{detector}.bin"
        with open(staged, "wb") as stream:
            c.write_random(stream, part_mib)
        datasets.append(
            FileDataset(
                path=str(staged), refs=[ref(PART, detector=detector)], formatter=FileArtifactFormatter
            )
        )
    small_dir = root / "small"
    small_dir.mkdir()
    for detector in range(smalls):
        path = small_dir / f"small{detector}.fits"
        hdu = fits.PrimaryHDU()
        hdu.header["DETECTOR"] = detector
        hdu.writeto(path)
        datasets.append(
            FileDataset(path=str(path), refs=[ref(SMALL, detector=detector)], formatter=FileArtifactFormatter)
        )
    butler.ingest(*datasets, transfer="copy")
    keys: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for dataset in datasets:
        (dataset_ref,) = dataset.refs
        key = split_s3_uri(str(butler.getURI(dataset_ref)))[2]
        keys.setdefault(dataset_ref.datasetType.name, []).append(key)
        sizes[key] = os.stat(dataset.path).st_size
    butler.close()
    shutil.rmtree(small_dir)
    for detector in range(parts):
        (root / f"part{detector}.bin").unlink()
    small_dirs = {key.rsplit("/", 1)[0] for key in keys[SMALL]}
    if len(small_dirs) != 1:
        raise RuntimeError(f"the small objects are not in one directory: {sorted(small_dirs)[:3]}")
    return Data(repo, keys[BIG][0], keys[PART], small_dirs.pop() + "/", smalls, sizes, big_local)


# -- servers -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Endpoint:
    """A server behind its proxy."""

    name: str
    server: MotoServer
    proxy: TcpProxy

    @property
    def url(self) -> str:
        return self.proxy.endpoint

    def counters(self) -> dict[str, int]:
        return self.proxy.counters()


@contextlib.contextmanager
def endpoint(name: str, root: Path, delay_ms: float, bandwidth: float) -> Iterator[Endpoint]:
    if name == "s3like":
        server: MotoServer = FileS3Server(root / "objects")
        shaping = ["--delay-ms", str(delay_ms), "--bandwidth-mbps", str(bandwidth)]
    else:
        server = MotoServer(env=MOTO_ENV)
        shaping = []
    server.start()
    proxy = TcpProxy(server.port, *shaping)
    with running(server):
        proxy.start()
        with running(proxy):
            yield Endpoint(name, server, proxy)


# -- the tools -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tool:
    """One client configuration."""

    name: str
    kind: str  # butlerfs, s3fs, rclone
    cached: bool
    """Whether it keeps a cache on disk (across mounts)."""
    label: str


TOOLS = [
    Tool("butlerfs", "butlerfs", True, "butlerfs (defaults: disk cache)"),
    Tool("butlerfs-nocache", "butlerfs", False, "butlerfs `--cache-size 0`"),
    Tool("s3fs", "s3fs", False, "s3fs (defaults)"),
    Tool("s3fs-cache", "s3fs", True, "s3fs `-o use_cache=DIR`"),
    Tool("rclone", "rclone", False, "rclone mount (defaults)"),
    Tool("rclone-full", "rclone", True, "rclone mount `--vfs-cache-mode full`"),
]


@dataclasses.dataclass
class Mounted:
    """A live mount: where each object is."""

    tool: Tool
    mountpoint: Path
    big: str
    parts: list[str]
    small_dir: str
    pid: int


class Mounter:
    """Mounts one tool over one endpoint's bucket; peers by PID, butlerfs by its API."""

    def __init__(self, work: Path, data: Data, ep: Endpoint) -> None:
        self.work = work
        self.data = data
        self.ep = ep
        self.mountpoint = work / "mnt"
        self.passwd = work / "s3fs-passwd"
        self.passwd.write_text(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        self.passwd.chmod(0o600)
        self.mounts = 0
        self.butlerfs_options: dict[str, Any] = {}
        """More `butlerfs.MountOptions` for every butlerfs mount."""

    def cache_dir(self, tool: Tool, fresh: bool) -> Path:
        path = self.work / "cache" / tool.name
        if fresh:
            c.remove_tree(path)
            path.mkdir(parents=True)
        return path

    @contextlib.contextmanager
    def mount(self, tool: Tool, fresh_cache: bool = True) -> Iterator[Mounted]:
        c.fresh_dir(self.mountpoint)
        cache = self.cache_dir(tool, fresh_cache)
        self.mounts += 1
        if tool.kind == "butlerfs":
            with self._butlerfs(tool, cache) as mounted:
                yield mounted
            return
        if tool.kind == "s3fs":
            cmd = [
                "s3fs",
                BUCKET,
                str(self.mountpoint),
                "-f",
                "-o",
                f"url={self.ep.url}",
                "-o",
                "use_path_request_style",
                "-o",
                f"passwd_file={self.passwd}",
                "-o",
                "ro",
            ]
            if tool.cached:
                cmd += ["-o", f"use_cache={cache}"]
            env = dict(os.environ)
        else:
            cmd = ["rclone", "mount", f"bench:{BUCKET}", str(self.mountpoint), "--read-only"]
            if tool.cached:
                cmd += ["--vfs-cache-mode", "full", "--cache-dir", str(cache)]
            env = dict(
                os.environ,
                RCLONE_CONFIG_BENCH_TYPE="s3",
                RCLONE_CONFIG_BENCH_PROVIDER="Other",
                RCLONE_CONFIG_BENCH_ENDPOINT=self.ep.url,
                RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=ACCESS_KEY,
                RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=SECRET_KEY,
                RCLONE_CONFIG_BENCH_REGION=REGION,
            )
            env.pop("AWS_CA_BUNDLE", None)  # rclone fails on it with an http endpoint
        log = open(self.work / f"{tool.kind}.log", "ab")
        process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        try:
            deadline = time.monotonic() + 30
            while not os.path.ismount(self.mountpoint):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{shlex.join(cmd)} did not mount (see {log.name})")
                time.sleep(0.05)
            root = self.mountpoint
            yield Mounted(
                tool,
                root,
                str(root / self.data.big_key),
                [str(root / k) for k in self.data.part_keys],
                str(root / self.data.small_prefix),
                process.pid,
            )
        finally:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()

    @contextlib.contextmanager
    def _butlerfs(self, tool: Tool, cache: Path) -> Iterator[Mounted]:
        import butlerfs

        saved = os.environ.get("S3_ENDPOINT_URL")
        os.environ["S3_ENDPOINT_URL"] = self.ep.url
        try:
            with butlerfs.mount(
                str(self.data.repo),
                str(self.mountpoint),
                collections=[RUN],
                cache_dir=str(cache),
                cache_size=(10 << 30) if tool.cached else 0,
                log_file=str(self.work / "butlerfs.log"),
                **self.butlerfs_options,
            ) as m:
                root = Path(m.mountpoint)
                big = next((root / BIG).rglob("*.fits"))
                parts = sorted((root / PART).rglob("*.*"), key=lambda p: _detector(p))
                yield Mounted(tool, root, str(big), [str(p) for p in parts], str(root / SMALL), m.pid)
        finally:
            if saved is not None:
                os.environ["S3_ENDPOINT_URL"] = saved


def _detector(path: Path) -> int:
    return int(path.parent.name.rpartition("_")[2])


# -- measuring -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """One measurement of one shape."""

    seconds: float
    nbytes: int = 0
    """Bytes the shape read (for MB/s)."""
    requests: int = 0
    fetched: int = 0
    """Bytes the server sent through the proxy (HTTP headers included)."""

    @property
    def mbps(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds else 0.0


class Bench:
    def __init__(self, args: argparse.Namespace, data: Data, ep: Endpoint, work: Path) -> None:
        self.args = args
        self.data = data
        self.ep = ep
        self.mounter = Mounter(work, data, ep)
        self.results: dict[tuple[str, str], list[Result]] = {}

    def record(self, tool: str, shape: str, result: Result) -> None:
        self.results.setdefault((tool, shape), []).append(result)
        detail = f"{result.mbps:.0f} MB/s" if shape in THROUGHPUT else c.seconds(result.seconds)
        say(
            f"    {self.ep.name} {tool:18s} {shape:15s} {detail:>10s}  {result.requests} requests, "
            f"{result.fetched:,} bytes fetched"
        )

    @contextlib.contextmanager
    def counted(self, nbytes: int, settle: bool = False) -> Iterator[list[Result]]:
        """Time a block; the proxy's counters around it (after a quiet spell if ``settle``)."""
        box: list[Result] = []
        before = self.ep.counters()
        start = time.perf_counter()
        yield box
        elapsed = time.perf_counter() - start
        after = settled(self.ep.counters) if settle else self.ep.counters()
        box.append(
            Result(
                elapsed,
                nbytes,
                after["requests"] - before["requests"],
                after["bytes_down"] - before["bytes_down"],
            )
        )

    # -- one tool, all shapes

    def tool(self, tool: Tool) -> None:
        for group in self.args.groups:
            getattr(self, f"shape_{group}")(tool)

    def shape_seq(self, tool: Tool) -> None:
        big_size = self.data.sizes[self.data.big_key]
        with self.mounter.mount(tool) as m:
            c.drop_caches()
            with self.counted(big_size) as box:
                dd(m.big, big_size)
            self.record(tool.name, "cold", box[0])
            with self.counted(big_size) as box:
                dd(m.big, big_size)
            self.record(tool.name, "warm", box[0])
        with self.mounter.mount(tool, fresh_cache=False) as m:
            c.drop_caches()
            with self.counted(big_size) as box:
                dd(m.big, big_size)
            self.record(tool.name, "remount", box[0])

    def shape_header(self, tool: Tool) -> None:
        for shape in HEADERS:
            with self.mounter.mount(tool) as m:
                c.drop_caches()
                with self.counted(2880, settle=True) as box:
                    read_header(shape, m.big)
                self.record(tool.name, shape, box[0])

    def shape_random(self, tool: Tool) -> None:
        big_size = self.data.sizes[self.data.big_key]
        with self.mounter.mount(tool) as m:
            c.drop_caches()
            with self.counted(0, settle=True) as box:
                result = fio_random(m.big, big_size, self.args.random_reads, self.mounter.work)
            result.requests, result.fetched = box[0].requests, box[0].fetched
            self.record(tool.name, "random", result)

    def shape_multi(self, tool: Tool) -> None:
        with self.mounter.mount(tool) as m:
            total = sum(self.data.sizes[k] for k in self.data.part_keys)
            c.drop_caches()
            with self.counted(total) as box:
                dd_many(m.parts, [self.data.sizes[k] for k in self.data.part_keys])
            self.record(tool.name, "multi", box[0])

    def shape_find(self, tool: Tool) -> None:
        with self.mounter.mount(tool) as m:
            c.drop_caches()
            with self.counted(0) as box:
                count = find_count(m.small_dir)
            if count != self.data.small_count:
                raise RuntimeError(f"{tool.name}: find saw {count} files, not {self.data.small_count}")
            self.record(tool.name, "find", box[0])

    def shape_ttfb(self, tool: Tool) -> None:
        with self.mounter.mount(tool) as m:
            c.drop_caches()
            for path in m.parts:
                with self.counted(1) as box:
                    first_byte(path)
                self.record(tool.name, "ttfb", box[0])

    # -- baselines

    def baselines(self) -> None:
        import boto3

        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.ep.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        big, size = self.data.big_key, self.data.sizes[self.data.big_key]
        c.drop_caches()
        with self.counted(size) as box, open(os.devnull, "wb") as sink:
            client.download_fileobj(BUCKET, big, sink)
        self.record("boto3", "cold", box[0])
        with self.counted(2880) as box:
            client.get_object(Bucket=BUCKET, Key=big, Range="bytes=0-2879")["Body"].read()
        self.record("boto3", "hdr_dd", box[0])
        offsets = random_offsets(size, self.args.random_reads)
        with self.counted(len(offsets) * RANDOM_BS) as box:
            for offset in offsets:
                client.get_object(Bucket=BUCKET, Key=big, Range=f"bytes={offset}-{offset + RANDOM_BS - 1}")[
                    "Body"
                ].read()
        self.record("boto3", "random", box[0])
        clients = [
            boto3.session.Session().client(
                "s3",
                endpoint_url=self.ep.url,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name=REGION,
            )
            for _ in self.data.part_keys
        ]

        def download(pair: tuple[Any, str]) -> None:
            with open(os.devnull, "wb") as sink:
                pair[0].download_fileobj(BUCKET, pair[1], sink)

        total = sum(self.data.sizes[k] for k in self.data.part_keys)
        with self.counted(total) as box, concurrent.futures.ThreadPoolExecutor(len(clients)) as pool:
            list(pool.map(download, zip(clients, self.data.part_keys, strict=True)))
        self.record("boto3", "multi", box[0])
        for key in self.data.part_keys:
            with self.counted(1) as box:
                client.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-0")["Body"].read()
            self.record("boto3", "ttfb", box[0])
        local = str(self.data.big_local)
        c.drop_caches()
        with self.counted(size) as box:
            dd(local, size)
        self.record("local", "cold", box[0])
        with self.counted(size) as box:
            dd(local, size)
        self.record("local", "warm", box[0])
        c.drop_caches()
        with self.counted(size) as box:
            dd(local, size)
        self.record("local", "remount", box[0])


def settled(counters: Callable[[], dict[str, int]], quiet: float = 0.5) -> dict[str, int]:
    """The counters once they have not moved for ``quiet`` seconds (read-ahead finishing)."""
    now = counters()
    for _ in range(60):
        time.sleep(quiet)
        again = counters()
        if again["bytes_down"] == now["bytes_down"] and again["requests"] == now["requests"]:
            return again
        now = again
    return now


def dd(path: str, size: int) -> None:
    _, result = c.run(["dd", f"if={path}", "of=/dev/null", "bs=1M"])
    copied = int(result.stderr.decode().splitlines()[-1].split()[0])
    if copied != size:
        raise RuntimeError(f"dd read {copied} bytes of {path}, not {size}")


def dd_many(paths: list[str], sizes: list[int]) -> None:
    procs = [
        subprocess.Popen(
            ["dd", f"if={p}", "of=/dev/null", "bs=1M"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for p in paths
    ]
    for proc, path, size in zip(procs, paths, sizes, strict=True):
        _, err = proc.communicate()
        copied = int(err.decode().splitlines()[-1].split()[0]) if proc.returncode == 0 else -1
        if copied != size:
            raise RuntimeError(
                f"dd of {path} failed or read {copied} bytes, not {size}: {err.decode()[-300:]}"
            )


def read_header(shape: str, path: str) -> None:
    """One header read of ``path`` by the reader ``shape`` names; checks what it read."""
    if shape == "hdr_dd":
        _, result = c.run(
            ["dd", f"if={path}", "of=/dev/stdout", "bs=2880", "count=1"], stdout=subprocess.PIPE
        )
        data = result.stdout
    elif shape == "hdr_py":
        with open(path, "rb") as stream:
            data = stream.read(2880)
    elif shape == "hdr_astropy":
        from astropy.io import fits

        data = fits.getheader(path)["OBJECT"].encode()
    else:
        _, result = c.run([c.find_tool("fitsheader"), path], stdout=subprocess.PIPE)
        data = result.stdout
    if FITS_OBJECT.encode() not in data:
        raise RuntimeError(f"{shape} of {path} did not read the header: {data[:200]!r}")


RANDOM_BS = 256 << 10


def random_offsets(size: int, count: int, seed: int = 12) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(size // RANDOM_BS) * RANDOM_BS for _ in range(count)]


def fio_random(path: str, size: int, count: int, work: Path) -> Result:
    """mountpoint-s3's ``rand_read`` job shape (256 KiB, sync), ``count`` reads; fio's own timing."""
    out = work / "fio.json"
    cmd = [
        "fio",
        "--name=rand_read",
        f"--filename={path}",
        "--rw=randread",
        "--bs=256k",
        f"--size={size}",
        f"--number_ios={count}",
        f"--io_size={count * RANDOM_BS}",
        "--ioengine=sync",
        "--fallocate=none",
        "--readonly",
        "--invalidate=1",
        "--randrepeat=1",
        "--norandommap",
        "--output-format=json",
        f"--output={out}",
    ]
    wall, _ = c.run(cmd)
    job = json.loads(out.read_text())["jobs"][0]["read"]
    if job["total_ios"] != count:
        raise RuntimeError(f"fio did {job['total_ios']} reads, not {count}")
    return Result(job["runtime"] / 1e3 or wall, job["io_bytes"])


def find_count(directory: str) -> int:
    _, result = c.run(["find", directory, "-type", "f", "-printf", "%s\n"], stdout=subprocess.PIPE)
    return len(result.stdout.splitlines())


def first_byte(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if len(os.pread(fd, 1, 0)) != 1:
            raise RuntimeError(f"no first byte from {path}")
    finally:
        os.close(fd)


def say(text: str) -> None:
    print(text, flush=True)


# -- the report ----------------------------------------------------------------------------------


def med(results: list[Result], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in results)


def cell(shape: str, results: list[Result] | None) -> str:
    if not results:
        return "-"
    if shape in THROUGHPUT:
        return f"{med(results, 'mbps'):.0f} MB/s"
    text = c.seconds(med(results, "seconds"))
    if shape in HEADERS:
        text += f", {med(results, 'fetched') / 1e6:.2f} MB"
    return text


def speed(shape: str, results: list[Result]) -> float:
    """Higher is better, for every shape."""
    return med(results, "mbps") if shape in THROUGHPUT else 1.0 / med(results, "seconds")


def verdicts(bench: Bench) -> list[tuple[str, str, bool]]:
    """(target, figure, met) for one server."""
    r = bench.results
    out = []
    peers = [t.name for t in TOOLS if t.kind != "butlerfs"]
    for shape in SHAPES:
        mine = r.get(("butlerfs", shape))
        theirs = {p: r[(p, shape)] for p in peers if (p, shape) in r}
        if not mine or not theirs:
            continue
        best = max(theirs, key=lambda p: speed(shape, theirs[p]))
        ratio = speed(shape, mine) / speed(shape, theirs[best])
        out.append((f"{SHAPES[shape]}: butlerfs / best peer ({best}) >= 1", f"{ratio:.2f}", ratio >= 1.0))
        if shape in HEADERS:
            least = min(theirs, key=lambda p: med(theirs[p], "fetched"))
            fetched, floor = med(mine, "fetched"), med(theirs[least], "fetched")
            out.append(
                (
                    f"{SHAPES[shape]}: bytes fetched <= every peer's (least: {least})",
                    f"{fetched / 1e6:.2f} MB vs {floor / 1e6:.2f} MB",
                    fetched <= floor,
                )
            )
            pct = 100 * fetched / bench.data.sizes[bench.data.big_key]
            out.append((f"{SHAPES[shape]}: <= 1% of the object", f"{pct:.2f} %", pct <= 1.0))
    if ("boto3", "cold") in r and ("butlerfs", "cold") in r:
        ratio = speed("cold", r["butlerfs", "cold"]) / speed("cold", r["boto3", "cold"])
        out.append(
            ("cold sequential: butlerfs / boto3 `download_fileobj` >= 0.9", f"{ratio:.2f}", ratio >= 0.9)
        )
    for shape in ("warm", "remount"):
        if ("local", shape) in r and ("butlerfs", shape) in r:
            ratio = speed(shape, r["butlerfs", shape]) / speed(shape, r["local", shape])
            out.append((f"{SHAPES[shape]}: butlerfs / local file >= 0.9", f"{ratio:.2f}", ratio >= 0.9))
    return out


def plot(benches: list[Bench], path: Path) -> None:
    """Speed relative to the best peer, shape by shape, one panel per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t.name for t in TOOLS]
    fig, axes = plt.subplots(len(benches), 1, figsize=(13, 4.2 * len(benches)), squeeze=False)
    for ax, bench in zip(axes[:, 0], benches, strict=True):
        shapes = [s for s in SHAPES if any((n, s) in bench.results for n in names)]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            values = []
            for shape in shapes:
                peers = [
                    bench.results[(t.name, shape)]
                    for t in TOOLS
                    if t.kind != "butlerfs" and (t.name, shape) in bench.results
                ]
                best = max(speed(shape, p) for p in peers) if peers else 0
                mine = bench.results.get((name, shape))
                values.append(speed(shape, mine) / best if mine and best else 0)
            ax.bar([x + i * width for x in range(len(shapes))], values, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
        ax.set_xticklabels([s.replace("hdr_", "header\n") for s in shapes], fontsize=8)
        ax.set_ylabel("speed / best peer's")
        ax.set_title(f"{bench.ep.name}: {ENDPOINT_TEXT[bench.ep.name]}", fontsize=9)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


ENDPOINT_TEXT = {
    "s3like": "file-backed S3 server behind 20 ms per request and 100 MB/s per connection",
    "moto": "moto server (every GET copies the whole object), counting proxy only",
}


def report(args: argparse.Namespace, benches: list[Bench], started: float, load_before: str) -> str:
    lines = []
    for bench in benches:
        names = [t.name for t in TOOLS] + ["boto3", "local"]
        labels = {t.name: t.label for t in TOOLS} | {
            "boto3": "boto3 `download_fileobj` / GETs",
            "local": "local file (same disk)",
        }
        rows = [[SHAPES[s], *(cell(s, bench.results.get((n, s))) for n in names)] for s in SHAPES]
        lines.append(
            f"**{bench.ep.name}** ({ENDPOINT_TEXT[bench.ep.name]}); {bench.mounter.mounts} mounts:\n"
        )
        lines.append(c.table(["shape", *(labels[n] for n in names)], rows))
        lines.append("")
        requests = [
            [
                SHAPES[s],
                *(
                    f"{med(bench.results[(n, s)], 'requests'):.0f}" if (n, s) in bench.results else "-"
                    for n in names[:-1]
                ),
            ]
            for s in SHAPES
        ]
        lines.append(f"HTTP requests per shape on {bench.ep.name} (median):\n")
        lines.append(c.table(["shape", *(labels[n] for n in names[:-1])], requests))
        lines.append("")
        checks = verdicts(bench)
        lines.append(f"Targets on {bench.ep.name}:\n")
        lines.append(
            c.table(
                ["target", "figure", "verdict"],
                [[t, f, "met" if ok else "**missed**"] for t, f, ok in checks],
            )
        )
        lines.append("")
    command = "`.venv/bin/python scripts/bench/bench_peers.py" + (
        f" {shlex.join(sys.argv[1:])}`" if sys.argv[1:] else "`"
    )
    missed = sum(not ok for b in benches for _, _, ok in verdicts(b))
    met = sum(ok for b in benches for _, _, ok in verdicts(b))
    return f"""
## butlerfs vs s3fs and rclone, shape by shape (`bench_peers.py`)

*{c.today()}{" — quick smoke run, not a result" if args.quick else ""}*

**Question.** Is a Butler repository in S3 read through butlerfs at least as fast as the
same bucket mounted with s3fs or rclone, for every common access shape, on a server that
costs like S3 and on moto, and does a FITS header read fetch no more than any of them?

**Command.** {command} (run as root). Servers, each started and stopped by PID: **s3like**,
`scripts/s3_file_server.py` (objects are files; a GET is `sendfile` of its range, so it
costs a constant plus its bytes, as on S3) behind `scripts/tcp_proxy.py --delay-ms
{args.delay_ms:g} --bandwidth-mbps {args.bandwidth_mbps:g}` (each request waits {args.delay_ms:g} ms
before reaching the server, each connection gets at most {args.bandwidth_mbps:g} MB/s from it);
**moto**, `python -m moto.server` (objects in memory; every GET, ranged or not, copies the
whole object) behind a proxy that only counts. Every client talks to the proxy; its
counters give each shape's HTTP requests and the bytes the server sent (HTTP headers
included), after waiting until they stop moving for 0.5 s (read-ahead still running is
counted). The bucket holds a Butler datastore (local SQLite registry): a FITS image of
{bench_size(benches)} bytes, {args.parts} artifacts of {args.part_mib} MiB, {args.smalls} small
FITS files in one key prefix. butlerfs mounts the repository; s3fs {tool_version("s3fs")} and
rclone {tool_version("rclone")} (Debian packages) mount the bucket and read the same objects
by key: `s3fs BUCKET MNT -o url=... -o use_path_request_style -o ro [-o use_cache=DIR]`,
`rclone mount remote:BUCKET MNT --read-only [--vfs-cache-mode full --cache-dir DIR]`
(`AWS_CA_BUNDLE` unset). Each shape gets a new mount with an empty cache and `sync; echo 3 >
/proc/sys/vm/drop_caches` first, except "warm" (a second `dd` in the mount of the cold read)
and "remount" (a new mount over the cache the cold read filled, page cache dropped). Shapes:
`dd if=F of=/dev/null bs=1M`; header reads of the big FITS by `dd bs=2880 count=1`, by
`open(F, 'rb').read(2880)` and `astropy.io.fits.getheader(F)` in this process, by the
`fitsheader F` command (time includes its start-up); `fio --rw=randread --bs=256k
--number_ios={args.random_reads} --ioengine=sync --readonly --invalidate=1` over the big file (fio's
own runtime); {args.parts} `dd bs=1M` at once; `find DIR -type f -printf '%s\\n'` where DIR holds the
small objects (for butlerfs: the dataset type's directory, one subdirectory per data ID);
`open` + `pread(fd, 1, 0)` of each of the {args.parts} artifacts (median). Baselines: boto3
{pkg("boto3")} `download_fileobj` (default `TransferConfig`), one ranged GET of 2880 bytes,
{args.random_reads} ranged GETs of 256 KiB, {args.parts} threads downloading, a 1-byte GET; `dd` of a
local copy on the benchmark's disk (cold and warm). {args.reps} repetition(s); medians.

**What each server models, and what it exaggerates.** *s3like* models S3's cost: a GET
pays a first-byte latency ({args.delay_ms:g} ms here; S3's is 15-30 ms) and then its bytes at a
bounded rate per connection ({args.bandwidth_mbps:g} MB/s; S3 gives about 90 MB/s per
connection), whatever the object's size, so more connections buy more bandwidth and a
small ranged GET is cheap. It exaggerates the regularity (no tail latency, no throttling,
no loss) and gives every client the machine's loopback and disk, so its aggregate
bandwidth ends where the proxy's and the clients' CPU end (on 2 cores, shared). *moto*
models an endpoint whose every GET costs the whole object: it copies the object out of
its buffer for any range, so a GET of 2880 bytes of the 256 MiB file costs what reading it
does, and one Python process (one core) serves everything. It exaggerates the cost of a
GET (real S3 never charges for bytes not sent) and rewards clients that send few, long
GETs; against it, latency and per-connection bandwidth do not matter.

**Machine.**
{chr(10).join(c.machine_facts(c.BENCH_DIR))}
{c.load_line(load_before)}

{chr(10).join(lines)}
![speed relative to the best peer, per shape and server](bench_peers.png)

**Conclusion.** {met} targets met, {missed} missed (tables above).{c.contention_note(load_before)}
Total benchmark time {time.perf_counter() - started:.0f} s.
"""


def bench_size(benches: list[Bench]) -> str:
    data = benches[0].data
    return f"{data.sizes[data.big_key]:,}"


def tool_version(name: str) -> str:
    flag = "--version" if name == "s3fs" else "version"
    out = subprocess.run([name, flag], capture_output=True, text=True)
    words = (out.stdout or out.stderr).split()
    return next((w.lstrip("v") for w in words if w[:1].isdigit() or w[:2] == "v1"), "unknown")


def pkg(name: str) -> str:
    from importlib.metadata import version

    return version(name)


# -- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="s3like,moto", help="which servers (default s3like,moto)")
    parser.add_argument(
        "--tools", default=",".join(t.name for t in TOOLS), help="which tool configurations (default all)"
    )
    parser.add_argument(
        "--groups",
        default=",".join(GROUPS),
        help=f"only these groups of shapes (default all: {','.join(GROUPS)})",
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    parser.add_argument("--size-mib", type=int, default=None, help="big FITS (default 256; 32 with --quick)")
    parser.add_argument("--part-mib", type=int, default=None, help="each concurrent artifact (default 64)")
    parser.add_argument("--parts", type=int, default=8, help="concurrent readers (default 8)")
    parser.add_argument("--smalls", type=int, default=None, help="small objects (default 1000)")
    parser.add_argument("--random-reads", type=int, default=200, help="fio reads (default 200)")
    parser.add_argument(
        "--delay-ms", type=float, default=20.0, help="s3like latency per request (default 20)"
    )
    parser.add_argument(
        "--bandwidth-mbps", type=float, default=100.0, help="s3like MB/s per connection (default 100)"
    )
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the 1-minute load average to fall below 1",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, one repetition")
    parser.add_argument("--keep", action="store_true", help="keep the repositories (default: delete them)")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    args.groups = [g for g in args.groups.split(",") if g]
    if set(args.groups) - set(GROUPS):
        parser.error(f"--groups: choose among {','.join(GROUPS)}")
    args.reps = args.reps or (1 if args.quick else 3)
    args.size_mib = args.size_mib or (32 if args.quick else 256)
    args.part_mib = args.part_mib or (8 if args.quick else 64)
    args.smalls = args.smalls or (100 if args.quick else 1000)
    # The labels say what ran.
    SHAPES["random"] = f"{args.random_reads} random 256 KiB reads (fio)"
    SHAPES["multi"] = f"{args.parts} concurrent readers of {args.parts} objects"
    SHAPES["find"] = f"`find` + stat of {args.smalls} small objects"
    c.require_root_for_cold()
    for tool in ("s3fs", "rclone", "fio", "fusermount3"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: run `make setup` (scripts/setup-system.sh installs it)")
    c.wait_for_quiet(args.wait_idle)
    started = time.perf_counter()
    load_before = c.load_average()
    tools = [t for t in TOOLS if t.name in args.tools.split(",")]
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        os.environ.pop(name, None)
    os.environ.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION
    )
    benches = []
    for name in args.servers.split(","):
        work = c.BENCH_DIR / "peers" / name
        c.remove_tree(work)
        work.mkdir(parents=True)
        try:
            with endpoint(name, work, args.delay_ms, args.bandwidth_mbps) as ep:
                os.environ["S3_ENDPOINT_URL"] = ep.server.endpoint  # building goes around the proxy
                ep.server.client().create_bucket(Bucket=BUCKET)
                t0 = time.perf_counter()
                say(f"{name}: building the repository under {work} ...")
                data = build(work / "data", name, args.size_mib, args.part_mib, args.parts, args.smalls)
                say(f"  built in {time.perf_counter() - t0:.0f} s")
                os.environ["S3_ENDPOINT_URL"] = ep.url
                bench = Bench(args, data, ep, work)
                for rep in range(args.reps):
                    say(f"  repetition {rep + 1} of {args.reps}")
                    bench.baselines()
                    order = tools if rep % 2 == 0 else tools[::-1]
                    for tool in order:
                        bench.tool(tool)
                benches.append(bench)
        finally:
            with contextlib.suppress(OSError):
                (work / "mnt").rmdir()
            if not args.keep:
                c.remove_tree(work / "data")
                c.remove_tree(work / "cache")
                c.remove_tree(work / "objects")
    body = report(args, benches, started, load_before)
    if not args.no_docs:
        plot(benches, PLOT)
    c.publish(SECTION, body, args.no_docs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
