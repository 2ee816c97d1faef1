"""End to end over a real S3 endpoint: a moto server process on 127.0.0.1.

The module builds one repository with a local SQLite registry and its datastore in
S3 (the demo, plus a large FITS and a few multi-block files), and one whose
``butler.yaml`` itself lives in S3. Reads through the mount are compared with boto3
downloads, and the mount's counters (the root's ``user.butlerfs.stats`` xattr) show
what was fetched. Fault tests run their own server, which they kill, pause or put
behind ``scripts/tcp_proxy.py``; every server and proxy is stopped by its PID.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import importlib.util
import io
import json
import os
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REGISTRIES, require, require_fuse, require_root, require_tool, run_cli
from s3server import ACCESS_KEY, MotoServer, Snapshot, TcpProxy, running
from test_cli_errors import _assert_clean_error, _assert_not_mounted

import butlerfs
from butlerfs.cache import BLOCK_SIZE

pytestmark = pytest.mark.fuse

BUCKET = "butlerfs-test"
EXTRA_RUN = "u/test/s3"
BIG = "bigFits"  # one FITS of 128 MiB: a header read must fetch < 1% of it
MEDIUM = "mediumFile"  # multi-block files of random bytes
MEDIUM_SIZE = 5 * BLOCK_SIZE + 12_345  # a short last block
MEDIUM_DETECTORS = (0, 1, 2)
BIG_SHAPE = (8192, 8192)  # int16: 128 MiB of data after the header
TIMEOUT = 3.0  # MountOptions.timeout of the fault tests
EIO_BOUND = TIMEOUT + 10.0  # seconds within which a failing read must return EIO
STATS_XATTR = "user.butlerfs.stats"


@dataclasses.dataclass
class S3Repos:
    """What the module fixture built."""

    server: MotoServer
    demo: object  # butlerfs.demo.DemoSummary
    repo2_uri: str
    """Directory URI of the repository whose butler.yaml is in S3."""
    repo2_run: str
    snapshot: Snapshot
    """Local copy of the demo's objects (not the big FITS), for fault tests' servers."""


def _make_fits(path: Path, shape: tuple[int, int]) -> None:
    """Write a valid int16 FITS image of zeros without holding it in memory."""
    from astropy.io import fits

    header = fits.Header()
    header["SIMPLE"] = True
    header["BITPIX"] = 16
    header["NAXIS"] = 2
    header["NAXIS1"] = shape[1]
    header["NAXIS2"] = shape[0]
    header["OBJECT"] = "butlerfs large artifact"
    data_size = shape[0] * shape[1] * 2
    with open(path, "wb") as stream:
        stream.write(header.tostring().encode())
        stream.truncate(stream.tell() + data_size + (-data_size) % 2880)


def _add_extra_datasets(root: str, staging: Path) -> None:
    """Put a big FITS and multi-block random files into the demo repository (in S3)."""
    from lsst.daf.butler import Butler, DatasetType

    from butlerfs.demo import INSTRUMENT
    from butlerfs.formatter import put_source_extension

    butler = Butler.from_config(root, writeable=True)
    butler.collections.register(EXTRA_RUN)
    types = {}
    for name in (BIG, MEDIUM):
        types[name] = DatasetType(
            name, ["instrument", "detector"], "ButlerfsFile", universe=butler.dimensions
        )
        butler.registry.registerDatasetType(types[name])
    big = staging / "big.fits"
    _make_fits(big, BIG_SHAPE)
    with put_source_extension(big) as uri:
        butler.put(uri, types[BIG], instrument=INSTRUMENT, detector=0, run=EXTRA_RUN)
    rng = np.random.default_rng(7)
    for detector in MEDIUM_DETECTORS:
        path = staging / f"medium{detector}.bin"
        path.write_bytes(rng.bytes(MEDIUM_SIZE))
        with put_source_extension(path) as uri:
            butler.put(uri, types[MEDIUM], instrument=INSTRUMENT, detector=detector, run=EXTRA_RUN)
    butler.close()


def _make_repo_in_s3(uri: str, db: Path, staging: Path) -> str:
    """Make a repository whose butler.yaml and datastore are in S3 (registry local)."""
    from lsst.daf.butler import Butler, Config, DatasetType

    from butlerfs.formatter import put_source_extension, storage_class_config

    config = Config(storage_class_config())
    config["registry", "db"] = f"sqlite:///{db}"
    Butler.makeRepo(uri, config=config, forceConfigRoot=False)
    butler = Butler.from_config(uri, writeable=True)
    butler.registry.insertDimensionData("instrument", {"name": "Cam", "detector_max": 4, "visit_max": 10})
    butler.registry.insertDimensionData(
        "detector", *({"instrument": "Cam", "id": d, "full_name": f"D{d}"} for d in range(2))
    )
    dataset_type = DatasetType(
        "s3file", ["instrument", "detector"], "ButlerfsFile", universe=butler.dimensions
    )
    butler.registry.registerDatasetType(dataset_type)
    run = "u/test/repo2"
    butler.collections.register(run)
    from astropy.io import fits

    sources = [staging / "repo2-0.fits", staging / "repo2-1.txt"]
    fits.PrimaryHDU(np.arange(100 * 100, dtype=np.float32).reshape(100, 100)).writeto(sources[0])
    sources[1].write_text("a text artifact\n" * 1000)
    for detector, source in enumerate(sources):
        with put_source_extension(source) as path:
            butler.put(path, dataset_type, instrument="Cam", detector=detector, run=run)
    butler.close()
    return run


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Repos]:
    """A moto server holding the test repositories; S3 variables set for the module."""
    require_fuse()
    for module in ("moto", "flask"):
        require(importlib.util.find_spec(module) is not None, "moto[server] (make setup)")
    from butlerfs.demo import make_demo_repo

    tmp = tmp_path_factory.mktemp("s3")
    server = MotoServer().start()
    with running(server), pytest.MonkeyPatch.context() as patch:
        for name, value in server.environ().items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        demo = make_demo_repo(
            str(tmp / "demo"), visits=2, detectors=3, image_size=256, datastore_root=f"s3://{BUCKET}/demo/"
        )
        staging = tmp / "staging"
        staging.mkdir()
        _add_extra_datasets(demo.root, staging)
        repo2 = f"s3://{BUCKET}/repo2/"
        repo2_run = _make_repo_in_s3(repo2, tmp / "repo2.sqlite3", staging)
        snapshot = Snapshot(tmp / "snapshot")
        snapshot.take(client, BUCKET, max_size=32 * BLOCK_SIZE)
        yield S3Repos(server, demo, repo2, repo2_run, snapshot)


@pytest.fixture(scope="module")
def s3_demo_pg(s3, request: pytest.FixtureRequest):
    """A demo repository with its registry in PostgreSQL and its datastore in the same bucket."""
    from conftest import make_repo

    return make_repo(
        request,
        "s3",
        "postgresql",
        visits=1,
        detectors=2,
        image_size=128,
        datastore_root=f"s3://{BUCKET}/demo-pg/",
    )


@pytest.fixture(params=REGISTRIES)
def s3_any_demo(s3, request: pytest.FixtureRequest):
    """The module's demo (SQLite registry) or `s3_demo_pg`: the test runs once per registry database."""
    return s3.demo if request.param == "sqlite" else request.getfixturevalue("s3_demo_pg")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _mount(repo: str, mountpoint: Path, tmp_path: Path, collections: list[str], **kwargs):
    """``butlerfs.mount`` with a private cache and log (never ``~/.cache``)."""
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    kwargs.setdefault("log_file", str(tmp_path / f"daemon-{mountpoint.name}.log"))
    return butlerfs.mount(repo, str(mountpoint), collections=collections, **kwargs)


def _stats(m) -> dict[str, int]:
    return json.loads(os.getxattr(m.mountpoint, STATS_XATTR))


def _settled_stats(m, quiet: float = 0.5) -> dict[str, int]:
    """Return the counters once no fetch has changed them for ``quiet`` seconds."""
    stats = _stats(m)
    for _ in range(20):
        time.sleep(quiet)
        again = _stats(m)
        if again == stats:
            break
        stats = again
    return stats


def _files(root: str | Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def _uri(path: Path) -> str:
    return os.getxattr(path, "user.butler.uri").decode()


def _read(path: Path, chunk: int = 1 << 20) -> bytes:
    """Read a whole file with reads of ``chunk`` bytes (unbuffered)."""
    parts = []
    with open(path, "rb", buffering=0) as stream:
        while data := stream.read(chunk):
            parts.append(data)
    return b"".join(parts)


class Boto3Truth:
    """The expected bytes of an artifact, downloaded with boto3 (zip members extracted)."""

    def __init__(self, client) -> None:
        self._client = client
        self._zips: dict[str, zipfile.ZipFile] = {}

    def __call__(self, uri: str) -> bytes:
        base, _, fragment = uri.partition("#")
        bucket, _, key = base[len("s3://") :].partition("/")
        if not fragment:
            return self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
        if base not in self._zips:
            body = self._client.get_object(Bucket=bucket, Key=key)["Body"].read()
            self._zips[base] = zipfile.ZipFile(io.BytesIO(body))
        return self._zips[base].read(fragment.removeprefix("zip-path="))


def _cache_blocks(cache: Path, key: str) -> list[Path]:
    entry = cache / "v1" / key[:2] / key
    return sorted(p for p in entry.iterdir() if p.name.isdigit()) if entry.is_dir() else []


def _cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / "v1").rglob("*") if p.is_file())


def _medium_files(m) -> list[Path]:
    files = _files(Path(m.mountpoint, MEDIUM))
    assert len(files) == len(MEDIUM_DETECTORS)
    return files


# Reading


def test_every_file_equals_its_boto3_download(s3, s3_any_demo, mountpoint, tmp_path):
    demo = s3_any_demo
    truth = Boto3Truth(s3.server.client())
    with _mount(demo.root, mountpoint, tmp_path, [demo.defaults]) as m:
        files = _files(m.mountpoint)
        assert len(files) == sum(demo.dataset_counts.values()) + demo.dataset_counts["postISRCCD"] * 2
        zipped = 0
        for path in files:
            uri = _uri(path)
            assert uri.startswith(demo.datastore_root) and demo.datastore_root.startswith("s3://"), uri
            zipped += "#zip-path=" in uri
            assert _read(path, 65536 + 7) == truth(uri), path
        assert zipped == demo.dataset_counts[demo.zip_dataset_type]


def test_fitsverify_and_astropy_read_through_the_mount(s3, mountpoint, tmp_path):
    from astropy.io import fits

    fitsverify = require_tool("fitsverify")
    with _mount(s3.demo.root, mountpoint, tmp_path, [s3.demo.defaults]) as m:
        calexp = _files(Path(m.mountpoint, "calexp"))[0]
        background = _files(Path(m.mountpoint, s3.demo.zip_dataset_type))[0]
        component = _files(Path(m.mountpoint, s3.demo.disassembled_dataset_type))[0]
        for path in (calexp, background, component):
            verify = subprocess.run([fitsverify, "-q", str(path)], capture_output=True, text=True)
            assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr
        with fits.open(calexp) as hdul:
            assert [h.name for h in hdul[1:4]] == ["IMAGE", "MASK", "VARIANCE"]
            assert hdul[1].data.shape == (256, 256)
        with fits.open(background) as hdul:
            assert len(hdul) >= 1


@pytest.mark.parametrize("form", ["butler.yaml", "directory"])
def test_repository_whose_butler_yaml_is_in_s3(s3, mountpoint, tmp_path, form):
    from astropy.io import fits

    repo = s3.repo2_uri + ("butler.yaml" if form == "butler.yaml" else "")
    truth = Boto3Truth(s3.server.client())
    with _mount(repo, mountpoint, tmp_path, [s3.repo2_run]) as m:
        files = _files(m.mountpoint)
        assert [f.name for f in files] == ["s3file_Cam_0.fits", "s3file_Cam_1.txt"]
        for path in files:
            assert _uri(path).startswith(s3.repo2_uri)
            assert path.read_bytes() == truth(_uri(path))
        assert fits.getdata(files[0])[99, 99] == 100 * 100 - 1


def test_header_read_fetches_one_block_not_the_object(s3, mountpoint, tmp_path, cache_dir):
    from astropy.io import fits

    with _mount(s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[BIG]) as m:
        (path,) = _files(m.mountpoint)
        size = path.stat().st_size
        assert size > 128 * BLOCK_SIZE
        header = fits.getheader(path)
        assert (header["NAXIS1"], header["NAXIS2"]) == BIG_SHAPE[::-1]
        assert header["OBJECT"] == "butlerfs large artifact"
        stats = _settled_stats(m)  # read-ahead in flight would show here
        key = os.getxattr(path, "user.butler.dataset_id").decode()
    assert 0 < stats["bytes_fetched"] <= 0.01 * size, stats
    assert [p.name for p in _cache_blocks(cache_dir, key)] == ["00000000"]


def test_sequential_read_fetches_each_byte_once(s3, mountpoint, tmp_path):
    truth = Boto3Truth(s3.server.client())
    with _mount(s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[MEDIUM]) as m:
        path = _medium_files(m)[0]
        assert _read(path, 128 * 1024) == truth(_uri(path))
        stats = _stats(m)
    assert stats["bytes_fetched"] == MEDIUM_SIZE, stats
    assert stats["blocks_fetched"] + stats["blocks_from_memory"] >= 6


def test_small_artifact_comes_whole_in_one_get(s3, mountpoint, tmp_path):
    truth = Boto3Truth(s3.server.client())
    with _mount(s3.demo.root, mountpoint, tmp_path, [s3.demo.defaults], dataset_types=["calexp"]) as m:
        path = _files(m.mountpoint)[0]
        size = path.stat().st_size
        assert 2 * 4096 < size <= 2 * BLOCK_SIZE
        # Small reads, out of order: the first one brings the whole object.
        expected = truth(_uri(path))
        with open(path, "rb", buffering=0) as stream:
            for offset in (size - 4096, 0, size // 2, 4096):
                stream.seek(offset)
                assert stream.read(4096) == expected[offset : offset + 4096]
        assert _read(path) == expected
        stats = _stats(m)
    assert stats["requests"] == 1 and stats["bytes_fetched"] == size, stats


def test_concurrent_readers_fetch_each_range_once(s3, mountpoint, tmp_path):
    truth = Boto3Truth(s3.server.client())
    readers = 8
    with _mount(s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[MEDIUM]) as m:
        path = _medium_files(m)[0]
        expected = truth(_uri(path))
        barrier = threading.Barrier(readers)

        def read(_: int) -> bytes:
            barrier.wait()
            return _read(path, 256 * 1024)

        with concurrent.futures.ThreadPoolExecutor(readers) as pool:
            results = list(pool.map(read, range(readers)))
        stats = _stats(m)
    assert all(r == expected for r in results)
    assert stats["bytes_fetched"] == MEDIUM_SIZE, stats


# The persistent cache


def test_remount_reads_cached_bytes_without_any_get(s3, mountpoint, tmp_path):
    truth = Boto3Truth(s3.server.client())
    collections = [s3.demo.defaults, EXTRA_RUN]
    types = ["calexp", s3.demo.zip_dataset_type, MEDIUM]
    with _mount(s3.demo.root, mountpoint, tmp_path, collections, dataset_types=types) as m:
        first = {p.relative_to(m.mountpoint): _read(p) for p in _files(m.mountpoint)}
        assert _stats(m)["requests"] > 0
    with _mount(s3.demo.root, mountpoint, tmp_path, collections, dataset_types=types) as m:
        second = {p.relative_to(m.mountpoint): _read(p) for p in _files(m.mountpoint)}
        uris = {p.relative_to(m.mountpoint): _uri(p) for p in _files(m.mountpoint)}
        stats = _stats(m)
    assert stats["requests"] == 0 and stats["bytes_fetched"] == 0, stats
    assert stats["blocks_from_cache"] > 0
    assert second == first
    assert all(data == truth(uris[name]) for name, data in second.items())


def test_two_mounts_share_a_cache_directory(s3, tmp_path, cache_dir):
    truth = Boto3Truth(s3.server.client())
    mountpoints = [tmp_path / "mnt-a", tmp_path / "mnt-b"]
    for path in mountpoints:
        path.mkdir()
    collections = [s3.demo.defaults, EXTRA_RUN]
    types = ["calexp", "raw", MEDIUM]
    with (
        _mount(s3.demo.root, mountpoints[0], tmp_path, collections, dataset_types=types) as a,
        _mount(s3.demo.root, mountpoints[1], tmp_path, collections, dataset_types=types) as b,
    ):
        paths = _files(a.mountpoint) + _files(b.mountpoint)
        expected = {p: truth(_uri(p)) for p in paths}
        # Both mounts read every file at the same time, some blocks fetched by one,
        # some by the other, and read from the shared cache by the second comer.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = dict(zip(paths, pool.map(_read, paths), strict=True))
        fetched = _stats(a)["bytes_fetched"] + _stats(b)["bytes_fetched"]
    assert all(results[p] == expected[p] for p in paths)
    total = sum(len(data) for data in expected.values()) // 2
    assert total <= fetched <= 2 * total


def test_corrupt_cache_blocks_are_fetched_again(s3, mountpoint, tmp_path, cache_dir):
    truth = Boto3Truth(s3.server.client())
    with _mount(s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[MEDIUM]) as m:
        path = _medium_files(m)[0]
        key = os.getxattr(path, "user.butler.dataset_id").decode()
        expected = truth(_uri(path))
        assert _read(path) == expected
    blocks = _cache_blocks(cache_dir, key)
    assert len(blocks) == 6 and blocks[-1].stat().st_size == MEDIUM_SIZE % BLOCK_SIZE
    os.truncate(blocks[0], 1000)  # short
    blocks[2].write_bytes(b"x" * (BLOCK_SIZE + 1))  # too long
    blocks[-1].write_bytes(b"")  # empty
    with _mount(s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[MEDIUM]) as m:
        assert _read(_medium_files(m)[0], 100_000) == expected
        stats = _stats(m)
    # Only the three bad blocks were fetched again; the others came from the cache.
    assert stats["bytes_fetched"] == 2 * BLOCK_SIZE + MEDIUM_SIZE % BLOCK_SIZE, stats
    assert stats["blocks_from_cache"] > 0, stats
    sizes = [p.stat().st_size for p in _cache_blocks(cache_dir, key)]
    assert sizes == [BLOCK_SIZE] * 5 + [MEDIUM_SIZE % BLOCK_SIZE]


def test_small_cache_size_stays_under_its_limit(s3, mountpoint, tmp_path, cache_dir):
    truth = Boto3Truth(s3.server.client())
    limit = 3 * BLOCK_SIZE
    collections = [s3.demo.defaults, EXTRA_RUN]
    with _mount(
        s3.demo.root, mountpoint, tmp_path, collections, dataset_types=["calexp", MEDIUM], cache_size=limit
    ) as m:
        total = 0
        checked = False
        for path in _files(m.mountpoint):
            data = _read(path)
            assert data == truth(_uri(path)), path
            if not checked and len(data) < limit // 2:
                # The fetch writes its blocks just after handing them to the reader.
                deadline = time.monotonic() + 5
                while _cache_bytes(cache_dir) == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert _cache_bytes(cache_dir) > 0, "a small artifact read was not cached"
                checked = True
            total += len(data)
        assert checked
    assert total > 5 * limit
    # Blocks are written, then the oldest entries evicted: the limit holds once writes end.
    # (An artifact larger than the whole limit is evicted too, so the cache may end empty.)
    assert _cache_bytes(cache_dir) <= limit


def test_cli_cache_prefetch_info_clear(s3, mountpoint, tmp_path, cache_dir):
    types = ["-t", "calexp", "-t", s3.demo.zip_dataset_type, "-t", MEDIUM]
    collections = ["-c", s3.demo.defaults, "-c", EXTRA_RUN]
    result = run_cli("cache", "prefetch", s3.demo.root, *collections, *types, "--cache-dir", str(cache_dir))
    assert result.returncode == 0, result.stderr
    assert "remote artifacts" in result.stdout
    info = run_cli("cache", "info", "--cache-dir", str(cache_dir), check=True).stdout
    entries = int(info.split("entries (datasets or components):")[1].split()[0])
    counts = s3.demo.dataset_counts
    assert entries >= counts["calexp"] + counts[s3.demo.zip_dataset_type] + len(MEDIUM_DETECTORS)
    assert str(cache_dir) in info and "MiB" in info
    with _mount(
        s3.demo.root,
        mountpoint,
        tmp_path,
        [s3.demo.defaults, EXTRA_RUN],
        dataset_types=["calexp", s3.demo.zip_dataset_type, MEDIUM],
    ) as m:
        truth = Boto3Truth(s3.server.client())
        for path in _files(m.mountpoint):
            assert _read(path) == truth(_uri(path)), path
        stats = _stats(m)
    assert stats["requests"] == 0, stats
    cleared = run_cli("cache", "clear", "--cache-dir", str(cache_dir), check=True).stdout
    assert f"Removed {entries} entries" in cleared
    info = run_cli("cache", "info", "--cache-dir", str(cache_dir), check=True).stdout
    assert "entries (datasets or components): 0" in info and "size: 0 B" in info
    assert _cache_bytes(cache_dir) == 0


def test_reads_through_a_slow_endpoint(s3, mountpoint, tmp_path, monkeypatch):
    slow = TcpProxy(s3.server.port, "--delay-ms", "20").start()
    truth = Boto3Truth(s3.server.client())
    monkeypatch.setenv("S3_ENDPOINT_URL", slow.endpoint)
    with (
        running(slow),
        _mount(
            s3.demo.root, mountpoint, tmp_path, [s3.demo.defaults, EXTRA_RUN], dataset_types=["raw", MEDIUM]
        ) as m,
    ):
        paths = _files(m.mountpoint)
        expected = [truth(_uri(path)) for path in paths]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(_read, paths))
    assert len(paths) == s3.demo.dataset_counts["raw"] + len(MEDIUM_DETECTORS)
    assert results == expected


def test_tcp_proxy_stall_flag_and_toggle(s3):
    import boto3
    import botocore.config
    import botocore.exceptions

    def client(proxy: TcpProxy):
        return boto3.client(
            "s3",
            endpoint_url=proxy.endpoint,
            config=botocore.config.Config(
                read_timeout=1, connect_timeout=1, retries={"total_max_attempts": 1}
            ),
        )

    stalled = TcpProxy(s3.server.port, "--stall").start()
    with running(stalled):
        with pytest.raises(botocore.exceptions.ReadTimeoutError):
            client(stalled).list_objects_v2(Bucket=BUCKET, MaxKeys=1)
        stalled.toggle_stall()  # SIGUSR1: forward from now on
        assert client(stalled).list_objects_v2(Bucket=BUCKET, MaxKeys=1)["KeyCount"] == 1
    assert stalled.process is not None and stalled.process.returncode == 0, "SIGTERM must stop it cleanly"


# Faults


@pytest.fixture
def own_server(s3, monkeypatch) -> Iterator[MotoServer]:
    """A server of the fault test's own, holding the demo's objects; the variables point at it."""
    server = MotoServer().start()
    with running(server):
        s3.snapshot.restore(server.client())
        monkeypatch.setenv("S3_ENDPOINT_URL", server.endpoint)
        yield server


def _eio_within(path: Path, bound: float) -> float:
    """Read ``path``: assert it fails with EIO within ``bound`` seconds; return the time taken."""
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        _read(path)
    elapsed = time.monotonic() - start
    assert info.value.errno == errno.EIO, info.value
    assert elapsed < bound, f"EIO after {elapsed:.1f} s"
    return elapsed


def test_endpoint_down_gives_eio_then_recovers(s3, own_server, mountpoint, tmp_path):
    with _mount(
        s3.demo.root, mountpoint, tmp_path, [s3.demo.defaults], dataset_types=["calexp"], timeout=TIMEOUT
    ) as m:
        first, second = _files(m.mountpoint)[:2]
        truth = Boto3Truth(own_server.client())
        expected = {p: truth(_uri(p)) for p in (first, second)}
        assert _read(first) == expected[first]
        own_server.kill()
        _eio_within(second, EIO_BOUND)
        assert os.listdir(m.mountpoint) == ["calexp"], "the mount must stay alive"
        assert len(_files(m.mountpoint)) == s3.demo.dataset_counts["calexp"]
        assert _read(first) == expected[first], "cached bytes stay readable"
        own_server.start()
        s3.snapshot.restore(own_server.client())
        assert _read(second) == expected[second]


@pytest.mark.parametrize("how", ["proxy", "sigstop"])
def test_stalled_endpoint_gives_eio_within_the_timeout(
    s3, own_server, mountpoint, tmp_path, monkeypatch, how
):
    # A stalled endpoint accepts connections and never answers: the proxy in front
    # stops forwarding (SIGUSR1), or the server itself is stopped (SIGSTOP).
    proxy = TcpProxy(own_server.port)
    if how == "proxy":
        proxy.start()
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
        stall = unstall = proxy.toggle_stall
    else:
        stall, unstall = own_server.pause, own_server.resume
    truth = Boto3Truth(own_server.client())
    with (
        running(proxy),
        _mount(
            s3.demo.root, mountpoint, tmp_path, [s3.demo.defaults], dataset_types=["calexp"], timeout=TIMEOUT
        ) as m,
    ):
        first, second = _files(m.mountpoint)[:2]
        expected = {p: truth(_uri(p)) for p in (first, second)}
        assert _read(first) == expected[first]
        stall()
        try:
            _eio_within(second, EIO_BOUND)
            assert os.listdir(m.mountpoint) == ["calexp"], "the mount must stay alive"
        finally:
            unstall()
        assert _read(second) == expected[second]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards."""
    require_root("an ordinary user cannot mount a tmpfs to fill")
    path = tmp_path / "tmpfs"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_full_cache_disk_does_not_fail_reads(s3, mountpoint, tmp_path, tiny_tmpfs):
    truth = Boto3Truth(s3.server.client())
    log = tmp_path / "daemon.log"
    with _mount(
        s3.demo.root,
        mountpoint,
        tmp_path,
        [EXTRA_RUN],
        dataset_types=[MEDIUM],
        cache_dir=str(tiny_tmpfs / "cache"),
        log_file=str(log),
    ) as m:
        for path in _medium_files(m):
            assert _read(path) == truth(_uri(path)), path
    warnings = [line for line in log.read_text().splitlines() if "is full" in line]
    assert len(warnings) == 1, warnings


def _clean_env(**changes: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def test_unknown_bucket_fails_the_mount_cleanly(s3, mountpoint):
    empty = MotoServer().start()  # an endpoint without the bucket
    with running(empty):
        result = run_cli(
            "mount",
            s3.demo.root,
            str(mountpoint),
            "-c",
            s3.demo.defaults,
            env=_clean_env(S3_ENDPOINT_URL=empty.endpoint),
        )
    _assert_clean_error(result, BUCKET, "does not exist")
    _assert_not_mounted(mountpoint)


def test_rejected_credentials_fail_the_mount_cleanly(s3, mountpoint):
    # Moto checks signatures once its first unauthenticated actions are used up.
    strict = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": "1"}).start()
    with running(strict):
        strict.client().create_bucket(Bucket=BUCKET)
        result = run_cli(
            "mount",
            s3.demo.root,
            str(mountpoint),
            "-c",
            s3.demo.defaults,
            env=_clean_env(S3_ENDPOINT_URL=strict.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY + "-unknown"),
        )
    _assert_clean_error(result, "InvalidAccessKeyId", "credentials")
    _assert_not_mounted(mountpoint)


def test_missing_credentials_fail_the_mount_cleanly(s3, mountpoint, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = _clean_env(
        AWS_ACCESS_KEY_ID=None,
        AWS_SECRET_ACCESS_KEY=None,
        AWS_SESSION_TOKEN=None,
        AWS_PROFILE=None,
        AWS_SHARED_CREDENTIALS_FILE=None,
        AWS_CONFIG_FILE=None,
        AWS_EC2_METADATA_DISABLED="true",  # no instance metadata service here
        HOME=str(home),
    )
    result = run_cli("mount", s3.demo.root, str(mountpoint), "-c", s3.demo.defaults, env=env)
    _assert_clean_error(result, "no S3 credentials", "AWS_ACCESS_KEY_ID")
    _assert_not_mounted(mountpoint)
