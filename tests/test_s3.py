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
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import REGISTRIES, require, require_fuse, require_root, require_tool, run_cli
from s3server import ACCESS_KEY, FileS3Server, MotoServer, Snapshot, TcpProxy, put_extra_datasets, running
from test_cli_errors import _assert_clean_error, _assert_not_mounted

import butlerfs
from butlerfs.cache import BLOCK_SIZE, LAYOUT, crc32c

pytestmark = pytest.mark.fuse

BUCKET = "butlerfs-test"
EXTRA_RUN = "u/test/s3"
BIG = "bigFits"  # one FITS of 128 MiB: a header read must fetch < 1% of it
MEDIUM = "mediumFile"  # multi-block files of random bytes
MEDIUM_SIZE = 5 * BLOCK_SIZE + 12_345  # a short last block
MEDIUM_DETECTORS = (0, 1, 2)
BIG_SHAPE = (8192, 8192)  # int16: 128 MiB of data after the header
TIMEOUT = 3.0  # MountOptions.timeout of the fault tests
SCHEDULING_SLACK = 2.0  # seconds a loaded machine may add to a bound (FUSE round trips, wake-ups)
EIO_BOUND = TIMEOUT + 0.2 + SCHEDULING_SLACK  # --timeout plus one retry back-off (docs/SEMANTICS.md)
FAILED_RECENTLY = 1.0  # seconds during which the blocks of a failed read fail again at once
STATS_XATTR = "user.butlerfs.stats"
SMALL_OBJECT = 2 << 20  # Fetcher.small_object: fetched whole on first read


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
        put_extra_datasets(
            demo.root,
            staging,
            EXTRA_RUN,
            big=(BIG, BIG_SHAPE, "butlerfs large artifact"),
            medium=(MEDIUM, MEDIUM_SIZE, MEDIUM_DETECTORS),
            seed=7,
        )
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
    entry = cache / LAYOUT / key[:2] / key
    return sorted(p for p in entry.iterdir() if p.name.isdigit()) if entry.is_dir() else []


def _cache_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in (cache / LAYOUT).rglob("*") if p.is_file())


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


def _read_header(reader: str, path: Path) -> None:
    """Read the FITS header of ``path`` the way ``reader`` does; check what it read."""
    from astropy.io import fits

    if reader == "dd":
        dd = ["dd", f"if={path}", "of=/dev/stdout", "bs=2880", "count=1"]
        out = subprocess.run(dd, capture_output=True)
        text = out.stdout.decode(errors="replace")
    elif reader == "python":
        with open(path, "rb") as stream:
            text = stream.read(2880).decode(errors="replace")
    elif reader == "astropy":
        header = fits.getheader(path)
        assert (header["NAXIS1"], header["NAXIS2"]) == BIG_SHAPE[::-1]
        text = header["OBJECT"]
    else:
        fitsheader = str(Path(sys.executable).parent / "fitsheader")
        text = subprocess.run([fitsheader, str(path)], capture_output=True, text=True, check=True).stdout
    assert "butlerfs large artifact" in text, text[:300]


@pytest.mark.parametrize("reader", ["dd", "python", "astropy", "fitsheader"])
def test_header_read_fetches_one_block_under_load(s3, mountpoint, tmp_path, cache_dir, reader):
    # The header read runs while other artifacts of the mount stream through the same
    # fetch threads. What it fetched is what the cache holds of its artifact once every
    # fetch has ended, whatever the timing: block 0 and nothing else.
    truth = Boto3Truth(s3.server.client())
    with _mount(s3.demo.root, mountpoint, tmp_path, [s3.demo.defaults, EXTRA_RUN]) as m:
        (path,) = _files(Path(m.mountpoint, BIG))
        others = _files(Path(m.mountpoint, MEDIUM)) + _files(Path(m.mountpoint, "raw"))
        size = path.stat().st_size
        assert size > 400 * BLOCK_SIZE
        start = threading.Barrier(len(others) + 1)

        def load(other: Path) -> bool:
            start.wait()
            return _read(other, 128 * 1024) == truth(_uri(other))

        with concurrent.futures.ThreadPoolExecutor(len(others)) as pool:
            loaded = [pool.submit(load, other) for other in others]
            start.wait()
            _read_header(reader, path)
            assert all(f.result() for f in loaded)
        _settled_stats(m)  # no fetch in flight any more
        key = os.getxattr(path, "user.butler.dataset_id").decode()
    blocks = [p.name for p in _cache_blocks(cache_dir, key)]
    assert blocks == ["00000000"], blocks
    assert BLOCK_SIZE <= 0.01 * size


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
        assert 2 * 4096 < size <= SMALL_OBJECT
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


def _pread_at(path: Path, offsets: list[int], length: int) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(fd, length, offset) for offset in offsets]
    finally:
        os.close(fd)


def test_random_reads_bring_the_rest_of_the_artifact_behind_them(s3, mountpoint, tmp_path, cache_dir):
    # Large reads that keep jumping: after the second jump the rest of the artifact comes
    # in the background, each byte once (the reads' own blocks are not fetched again).
    truth = Boto3Truth(s3.server.client())
    with _mount(s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[BIG]) as m:
        (path,) = _files(Path(m.mountpoint, BIG))
        size = path.stat().st_size
        expected = truth(_uri(path))
        offsets = [b * BLOCK_SIZE for b in (size // BLOCK_SIZE * f // 10 for f in (7, 2, 5))]
        got = _pread_at(path, offsets, 256 * 1024)
        assert got == [expected[o : o + 256 * 1024] for o in offsets]
        key = os.getxattr(path, "user.butler.dataset_id").decode()
        # The fill runs behind the reads: on a loaded machine moto's first GET of it (a copy of
        # the whole object) can outlast _settled_stats's quiet interval, so wait for its blocks.
        deadline = time.monotonic() + 120
        while len(_cache_blocks(cache_dir, key)) < -(-size // BLOCK_SIZE) and time.monotonic() < deadline:
            time.sleep(0.2)
        stats = _settled_stats(m)
        assert len(_cache_blocks(cache_dir, key)) == -(-size // BLOCK_SIZE)
        assert stats["bytes_fetched"] == size and stats["artifacts_filled"] == 1, stats
        assert _read(path) == expected
        assert _stats(m)["requests"] == stats["requests"]


def test_a_walk_through_headers_does_not_fetch_the_artifact(s3, mountpoint, tmp_path):
    # Small reads that jump about (a multi-extension FITS's headers, one after another)
    # fetch around what they read (aligned chunks, as large as the server's latency makes
    # free), never the whole artifact behind them.
    truth = Boto3Truth(s3.server.client())
    with _mount(s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[BIG]) as m:
        (path,) = _files(Path(m.mountpoint, BIG))
        size = path.stat().st_size
        expected = truth(_uri(path))
        # Six headers 20 MiB apart: each read is a jump (more than 16 MiB from the last).
        offsets = [(20 << 20) * k // 2880 * 2880 for k in range(6)]
        assert offsets[-1] < size
        got = _pread_at(path, offsets, 2880)
        assert got == [expected[o : o + 2880] for o in offsets]
        stats = _settled_stats(m)
    assert stats["artifacts_filled"] == 0, stats


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
    assert len(blocks) == 6 and blocks[-1].stat().st_size == MEDIUM_SIZE % BLOCK_SIZE + 4
    os.truncate(blocks[0], 1000)  # short
    blocks[2].write_bytes(b"x" * (BLOCK_SIZE + 5))  # too long
    blocks[-1].write_bytes(b"")  # empty
    with _mount(s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[MEDIUM]) as m:
        assert _read(_medium_files(m)[0], 100_000) == expected
        stats = _stats(m)
    # Only the three bad blocks were fetched again; the others came from the cache.
    assert stats["bytes_fetched"] == 2 * BLOCK_SIZE + MEDIUM_SIZE % BLOCK_SIZE, stats
    assert stats["blocks_from_cache"] > 0 and stats["blocks_corrupt"] == 3, stats
    sizes = [p.stat().st_size for p in _cache_blocks(cache_dir, key)]
    assert sizes == [BLOCK_SIZE + 4] * 5 + [MEDIUM_SIZE % BLOCK_SIZE + 4]


def _flip(block: Path, offset: int) -> None:
    """Change one byte of a block file in place: same size, other bytes."""
    with open(block, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0x5A]))


def _fill_cache(s3, mountpoint: Path, tmp_path: Path) -> tuple[str, bytes]:
    """Read the first MEDIUM file through a mount; return its key and bytes."""
    truth = Boto3Truth(s3.server.client())
    with _mount(s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[MEDIUM]) as m:
        path = _medium_files(m)[0]
        expected = truth(_uri(path))
        assert _read(path) == expected
        return os.getxattr(path, "user.butler.dataset_id").decode(), expected


def _assert_block_checks(cache_dir: Path, key: str) -> None:
    for block in _cache_blocks(cache_dir, key):
        data = block.read_bytes()
        assert crc32c(data[:-4]) == data[-4:], block


def test_flipped_bytes_in_a_cached_block_between_mounts(s3, mountpoint, tmp_path, cache_dir):
    key, expected = _fill_cache(s3, mountpoint, tmp_path)
    blocks = _cache_blocks(cache_dir, key)
    _flip(blocks[1], 1000)  # in the data
    _flip(blocks[4], BLOCK_SIZE + 2)  # in the checksum
    with _mount(s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[MEDIUM]) as m:
        assert _read(_medium_files(m)[0]) == expected
        stats = _stats(m)
    assert stats["blocks_corrupt"] == 2 and stats["bytes_fetched"] == 2 * BLOCK_SIZE, stats
    _assert_block_checks(cache_dir, key)


def test_flipped_bytes_in_a_cached_block_while_mounted(s3, mountpoint, tmp_path, cache_dir):
    key, expected = _fill_cache(s3, mountpoint, tmp_path)
    with _mount(s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[MEDIUM]) as m:
        path = _medium_files(m)[0]
        with open(path, "rb", buffering=0) as stream:  # the mount serves block 0 from the cache
            assert stream.read(4096) == expected[:4096]
        _flip(_cache_blocks(cache_dir, key)[3], 77)
        assert _read(path) == expected
        stats = _stats(m)
    assert stats["blocks_corrupt"] == 1 and stats["bytes_fetched"] == BLOCK_SIZE, stats
    assert stats["blocks_from_cache"] >= 5, stats
    _assert_block_checks(cache_dir, key)


def test_a_cache_of_an_older_layout_is_removed(tmp_path):
    from butlerfs.cache import BlockCache

    old = tmp_path / "cache" / "v1" / "ab" / "abcd"
    old.mkdir(parents=True)
    (old / "00000000").write_bytes(b"unchecked bytes")
    cache = BlockCache(str(tmp_path / "cache"), 1 << 30)
    assert not (tmp_path / "cache" / "v1").exists()
    assert cache.info().entries == 0 and (tmp_path / "cache" / LAYOUT).is_dir()


def test_small_cache_size_stays_under_its_limit(s3, mountpoint, tmp_path, cache_dir):
    truth = Boto3Truth(s3.server.client())
    limit = 4 * BLOCK_SIZE
    collections = [s3.demo.defaults, EXTRA_RUN]
    with _mount(
        s3.demo.root, mountpoint, tmp_path, collections, dataset_types=["calexp", MEDIUM], cache_size=limit
    ) as m:
        total = 0
        checked = False
        for path in _files(m.mountpoint):
            data = _read(path)
            assert data == truth(_uri(path)), path
            if not checked and len(data) < limit:
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


def test_tcp_proxy_paces_each_connection_and_counts(tmp_path):
    # Pacing can only make a transfer slower, so a lower bound on its time is no timing bet.
    size = 3_000_000
    server = FileS3Server(tmp_path / "objects").start()
    paced = TcpProxy(server.port, "--bandwidth-mbps", "10", "--delay-ms", "50")
    with running(server):
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        data = os.urandom(size)
        client.put_object(Bucket=BUCKET, Key="paced", Body=data)
        paced.start()
        with running(paced):
            via = MotoServer(port=paced.port).client()  # a client of the proxy's endpoint
            before = paced.counters()
            start = time.monotonic()
            assert via.get_object(Bucket=BUCKET, Key="paced")["Body"].read() == data
            elapsed = time.monotonic() - start
            after = paced.counters()
        ranged = client.get_object(Bucket=BUCKET, Key="paced", Range="bytes=100-199")["Body"].read()
        stats = server.stats()
    assert elapsed >= size / 10e6 + 0.05, elapsed
    assert after["requests"] - before["requests"] == 1
    assert size <= after["bytes_down"] - before["bytes_down"] <= size + 2000
    assert ranged == data[100:200]
    assert stats["requests"]["GetObject"] == 2 and stats["body_bytes_sent"] == size + 100


# Faults


@pytest.fixture
def own_server(s3, monkeypatch) -> Iterator[MotoServer]:
    """A server of the fault test's own, holding the demo's objects; the variables point at it."""
    server = MotoServer().start()
    with running(server):
        s3.snapshot.restore(server.client())
        monkeypatch.setenv("S3_ENDPOINT_URL", server.endpoint)
        yield server


def _eio_within(path: Path, bound: float, chunk: int = 1 << 20) -> float:
    """Read ``path`` until a read fails; assert that read failed with EIO within ``bound`` seconds.

    The bound is per read, as docs/SEMANTICS.md states it: the reads before the failing one
    (of bytes already fetched, which a loaded machine may serve slowly) are not counted.
    Returns the failing read's time.
    """
    failure: OSError | None = None
    with open(path, "rb", buffering=0) as stream:
        while failure is None:
            start = time.monotonic()
            try:
                data = stream.read(chunk)
            except OSError as err:
                failure = err
            else:
                assert data, f"{path}: read to its end, no EIO"
    elapsed = time.monotonic() - start
    assert failure.errno == errno.EIO, failure
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
        time.sleep(FAILED_RECENTLY)
        assert _read(second) == expected[second]


@pytest.fixture(scope="module")
def file_objects(s3, tmp_path_factory) -> Path:
    """The objects of a file-backed server holding the demo's objects and the big FITS."""
    root = tmp_path_factory.mktemp("file-objects")
    server = FileS3Server(root).start()
    with running(server):
        s3.snapshot.restore(server.client())
        source = s3.server.client()
        for page in source.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="demo/"):
            for item in page.get("Contents", []):
                if (BUCKET, item["Key"]) not in s3.snapshot.objects:
                    body = source.get_object(Bucket=BUCKET, Key=item["Key"])["Body"]
                    server.client().upload_fileobj(body, BUCKET, item["Key"])
    return root


@pytest.fixture
def file_server(file_objects, tmp_path, monkeypatch) -> Iterator[FileS3Server]:
    """A file-backed server of the test's own (objects survive a restart), the variables pointing at it."""
    root = tmp_path / "objects"
    subprocess.run(["cp", "-al", str(file_objects), str(root)], check=True)  # hard links: tests only read
    server = FileS3Server(root).start()
    with running(server):
        monkeypatch.setenv("S3_ENDPOINT_URL", server.endpoint)
        yield server


@pytest.mark.parametrize("how", ["stall", "down"])
@pytest.mark.parametrize("concurrency", [1, 2, 16])
def test_every_read_fails_within_the_timeout_however_many_parts_wait(
    s3, file_server, mountpoint, tmp_path, monkeypatch, concurrency, how
):
    # A sequential read of the big FITS has its read-ahead GETs queued or in flight when
    # the endpoint stalls or goes down; it and three more readers then read on. Each read
    # must fail within --timeout of reaching the daemon, whatever the fetch threads are
    # stuck on, then work again once the endpoint is back. Reads of 64 KiB keep the
    # kernel's requests well below the daemon's 64 threads (docs/SEMANTICS.md).
    proxy = TcpProxy(file_server.port).start()
    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.endpoint)
    truth = Boto3Truth(file_server.client())
    with (
        running(proxy),
        _mount(
            s3.demo.root, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[BIG, MEDIUM],
            timeout=TIMEOUT, fetch_concurrency=concurrency, cache_size=0,
        ) as m,
    ):
        (big,) = _files(Path(m.mountpoint, BIG))
        paths = [big, *_medium_files(m)]
        expected = {p: truth(_uri(p)) for p in paths}
        with open(big, "rb", buffering=0) as stream:  # the read-ahead gets going
            for _ in range(64):
                assert stream.read(64 * 1024)
        assert _stats(m)["requests"] >= 2
        if how == "stall":
            proxy.toggle_stall()
        else:
            file_server.kill()
        try:
            with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
                times = list(pool.map(lambda p: _eio_within(p, EIO_BOUND, chunk=64 * 1024), paths))
        finally:
            if how == "stall":
                proxy.toggle_stall()
            else:
                file_server.start()
        assert max(times) < EIO_BOUND, times
        time.sleep(FAILED_RECENTLY)
        with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
            assert list(pool.map(_read, paths)) == [expected[p] for p in paths]


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
