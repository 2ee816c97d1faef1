"""A client/server Butler, as the Rubin Science Platform serves it: daf_butler's own server.

One repository with its datastore in S3 (a moto server process) is served by a real Butler
server (uvicorn, `butlerserver.ButlerServer`) whose signed URLs point at
`butlerserver.ExpiringStorage`, a proxy in front of moto that can expire them. The remote
mount is compared byte for byte with a direct mount of the same repository; ``run`` and
``cache prefetch`` go through the server; the server is killed and started again; the
errors a user can make are one line each. Every process is stopped by its PID.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import importlib.util
import json
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from butlerserver import ButlerServer, ExpiringStorage
from conftest import require, require_fuse, run_cli
from s3server import MotoServer, free_port, put_extra_datasets, running
from test_cli_errors import _assert_clean_error, _assert_not_mounted

import butlerfs
from butlerfs.cache import BLOCK_SIZE
from butlerfs.errors import UsageError

pytestmark = pytest.mark.fuse

BUCKET = "butlerfs-remote"
EXTRA_RUN = "u/test/remote"
MEDIUM = "mediumFile"
MEDIUM_SIZE = 9 * BLOCK_SIZE + 4321  # above Fetcher.small_object: read block by block, not whole
MEDIUM_DETECTORS = (0, 1)
BIG = "bigFits"
BIG_SHAPE = (2048, 4096)  # int16: 16 MiB after the header
TOKEN = f"butlerfs-test-token-{uuid.uuid4().hex}"
LABEL = "remote-demo"
STATS_XATTR = "user.butlerfs.stats"
TIMEOUT = 3.0
EIO_BOUND = TIMEOUT + 10.0


@dataclasses.dataclass
class Remote:
    """What the module fixture runs."""

    moto: MotoServer
    storage: ExpiringStorage
    server: ButlerServer
    demo: object  # butlerfs.demo.DemoSummary, datastore in S3
    url: str
    """The demo repository's URL on the Butler server."""


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory, demo) -> Iterator[Remote]:
    """Moto, the expiring proxy and a Butler server serving the S3 demo and the POSIX demo."""
    require_fuse()
    for module in ("moto", "uvicorn", "httpx2", "safir"):
        require(
            importlib.util.find_spec(module) is not None, f"{module} (make setup: lsst-daf-butler[server])"
        )
    from butlerfs.demo import make_demo_repo

    tmp = tmp_path_factory.mktemp("remote")
    moto = MotoServer().start()
    storage = ExpiringStorage(moto.port).start()
    server = ButlerServer({}, {}, tmp / "server.log")  # replaced below, once the repositories exist
    with running(moto), pytest.MonkeyPatch.context() as patch:
        try:
            for name, value in moto.environ().items():
                patch.setenv(name, value)
            patch.delenv("AWS_PROFILE", raising=False)
            patch.delenv("ACCESS_TOKEN", raising=False)
            moto.client().create_bucket(Bucket=BUCKET)
            summary = make_demo_repo(
                str(tmp / "demo"),
                visits=2,
                detectors=2,
                image_size=128,
                datastore_root=f"s3://{BUCKET}/demo/",
            )
            staging = tmp / "staging"
            staging.mkdir()
            put_extra_datasets(
                summary.root,
                staging,
                EXTRA_RUN,
                big=(BIG, BIG_SHAPE, "remote header read"),
                medium=(MEDIUM, MEDIUM_SIZE, MEDIUM_DETECTORS),
                seed=11,
            )
            server = ButlerServer(
                {"demo": f"{summary.root}/butler.yaml", "posix": f"{demo.root}/butler.yaml"},
                moto.environ(endpoint=storage.endpoint),  # signed URLs point at the proxy
                tmp / "server.log",
            )
            server.start("demo")
            index = tmp / "repositories.yaml"
            index.write_text(f"{LABEL}: {server.url('demo')}\n")
            patch.setenv("DAF_BUTLER_REPOSITORY_INDEX", str(index))
            patch.setenv("BUTLER_RUBIN_ACCESS_TOKEN", TOKEN)
            yield Remote(moto, storage, server, summary, server.url("demo"))
        finally:
            server.stop()
            storage.stop()


@pytest.fixture
def storage(remote) -> Iterator[ExpiringStorage]:
    """The proxy, its counters reset, expiring nothing unless the test says so."""
    remote.storage.reset()
    yield remote.storage
    remote.storage.reset()


def _mount(repo: str, mountpoint: Path, tmp_path: Path, collections: list[str], **kwargs):
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    kwargs.setdefault("log_file", str(tmp_path / f"daemon-{mountpoint.name}.log"))
    return butlerfs.mount(repo, str(mountpoint), collections=collections, **kwargs)


def _files(root: str | Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def _stats(m) -> dict[str, int]:
    return json.loads(os.getxattr(m.mountpoint, STATS_XATTR))


def _read(path: Path, chunk: int = 1 << 20) -> bytes:
    parts = []
    with open(path, "rb", buffering=0) as stream:
        while data := stream.read(chunk):
            parts.append(data)
    return b"".join(parts)


def _xattrs(path: Path) -> dict[str, str]:
    return {name: os.getxattr(path, name).decode() for name in os.listxattr(path)}


def _assert_no_token_reached(storage: ExpiringStorage) -> None:
    assert storage.requests > 0
    assert "authorization" not in storage.header_names, storage.header_names
    assert not any(TOKEN in value for value in storage.header_values)


# The mount


def test_remote_mount_equals_direct_mount_and_remounts_from_cache(remote, storage, tmp_path):
    """Listing, sizes, xattrs and bytes of every file, zip members and components included.

    A remount of the remote repository then reads every byte from the cache, asking nothing
    of the server or the storage host.
    """
    collections = [remote.demo.defaults, EXTRA_RUN]
    types = [*remote.demo.dataset_counts, MEDIUM]
    points = [tmp_path / "direct", tmp_path / "remote"]
    for point in points:
        point.mkdir()
    remote_cache = str(tmp_path / "remote-cache")  # not the direct mount's: its blocks have the same keys
    with (
        _mount(remote.demo.root, points[0], tmp_path, collections, dataset_types=types) as direct,
        _mount(LABEL, points[1], tmp_path, collections, dataset_types=types, cache_dir=remote_cache) as m,
    ):
        files = [p.relative_to(direct.mountpoint) for p in _files(direct.mountpoint)]
        assert [p.relative_to(m.mountpoint) for p in _files(m.mountpoint)] == files
        assert len(files) > sum(remote.demo.dataset_counts.values())
        sizes = {name: Path(m.mountpoint, name).stat().st_size for name in files}
        assert sizes == {name: Path(direct.mountpoint, name).stat().st_size for name in files}
        assert _stats(m)["requests"] == 0, "listing and sizes must not read any artifact"
        zipped = components = 0
        contents = {}
        for name in files:
            here, there = _xattrs(Path(m.mountpoint, name)), _xattrs(Path(direct.mountpoint, name))
            uri = here.pop("user.butler.uri")
            assert there.pop("user.butler.uri").startswith(f"s3://{BUCKET}/")
            assert here == there, name
            dataset_id = here["user.butler.dataset_id"]
            assert uri.startswith(f"{remote.url}/v1/dataset/{dataset_id}/download"), uri
            assert "Signature" not in uri and "X-Amz" not in uri
            zipped += "#zip-path=" in uri
            components += "?component=" in uri
            contents[name] = _read(Path(direct.mountpoint, name))
            assert _read(Path(m.mountpoint, name), 65536 + 7) == contents[name], name
        assert zipped == remote.demo.dataset_counts[remote.demo.zip_dataset_type]
        assert components == 3 * remote.demo.dataset_counts[remote.demo.disassembled_dataset_type]
    _assert_no_token_reached(storage)
    seen = storage.requests
    with _mount(
        remote.url, points[1], tmp_path, collections, dataset_types=types, cache_dir=remote_cache
    ) as m:
        assert {name: _read(Path(m.mountpoint, name)) for name in files} == contents
        stats = _stats(m)
    assert stats["requests"] == 0 and stats["bytes_fetched"] == 0, stats
    assert stats["blocks_from_cache"] > 0
    assert storage.requests == seen


def test_fits_header_read_fetches_one_block(remote, storage, mountpoint, tmp_path):
    from astropy.io import fits

    with _mount(remote.url, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[BIG]) as m:
        (path,) = _files(m.mountpoint)
        header = fits.getheader(path)
        assert header["OBJECT"] == "remote header read"
        assert (header["NAXIS1"], header["NAXIS2"]) == BIG_SHAPE[::-1]
        time.sleep(0.5)  # any read-ahead in flight would be counted now
        stats = _stats(m)
    assert stats["blocks_fetched"] == 1 and 0 < stats["bytes_fetched"] <= BLOCK_SIZE, stats
    assert stats["requests"] == 2, "one signed URL, one ranged GET"


# Signed URLs


def _medium_paths(m) -> list[Path]:
    paths = _files(Path(m.mountpoint, MEDIUM))
    assert len(paths) == len(MEDIUM_DETECTORS)
    return paths


def _pread(path: Path, offset: int, size: int = 4096) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def test_signed_urls_are_renewed_before_they_expire(remote, storage, mountpoint, tmp_path):
    storage.reset(lifetime=3.0)
    with _mount(
        remote.url, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[MEDIUM], url_lifetime=0.5, cache_size=0
    ) as m:
        path = _medium_paths(m)[0]
        expected = remote.moto.client().get_object(Bucket=BUCKET, Key=_key(remote, path))["Body"].read()
        assert _pread(path, 0) == expected[:4096]
        time.sleep(1.1)  # past url_lifetime (and into the next second: SigV2 signs whole seconds)
        assert _pread(path, 4 * BLOCK_SIZE) == expected[4 * BLOCK_SIZE : 4 * BLOCK_SIZE + 4096]
    assert storage.signatures() == 2, "the second read must use a fresh URL"
    assert storage.refused == 0


def _key(remote, path: Path) -> str:
    """The S3 key of a mounted file of the demo (by its dataset's record path)."""
    from lsst.daf.butler import Butler

    dataset_id = os.getxattr(path, "user.butler.dataset_id").decode()
    butler = Butler.from_config(remote.demo.root)
    try:
        uri = butler.getURI(butler.get_dataset(uuid.UUID(dataset_id)))
    finally:
        butler.close()
    return str(uri).removeprefix(f"s3://{BUCKET}/")


def test_expired_urls_are_replaced_under_load(remote, storage, mountpoint, tmp_path):
    lifetime = 2.0
    storage.reset(lifetime=lifetime)
    with _mount(remote.url, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[MEDIUM], cache_size=0) as m:
        paths = _medium_paths(m)
        expected = {
            p: remote.moto.client().get_object(Bucket=BUCKET, Key=_key(remote, p))["Body"].read()
            for p in paths
        }
        for path in paths:  # one signed URL per file, used once
            assert _pread(path, 0) == expected[path][:4096]
        time.sleep(lifetime + 0.2)  # every URL is expired now

        def read(job: tuple[Path, int]) -> bool:
            path, block = job
            offset = block * BLOCK_SIZE + 100
            return _pread(path, offset, 8192) == expected[path][offset : offset + 8192]

        jobs = [(path, block) for path in paths for block in (1, 2, 3, 4, 5)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(read, jobs))
    assert all(results)
    assert storage.refused >= len(paths), "every file's expired URL was refused once at least"
    # Single flight: concurrent readers of a file share one fresh URL.
    assert storage.signatures() <= 2 * len(paths) + 2, storage.signatures()
    _assert_no_token_reached(storage)


# Faults


def test_server_down_gives_eio_then_recovers(remote, storage, mountpoint, tmp_path):
    with _mount(
        remote.url, mountpoint, tmp_path, [remote.demo.defaults, EXTRA_RUN], timeout=TIMEOUT, cache_size=0
    ) as m:
        first, second = _files(Path(m.mountpoint, "calexp"))[:2]
        expected = _read(first)
        remote.server.kill()
        try:
            start = time.monotonic()
            with pytest.raises(OSError) as info:
                _read(second)  # its URL must be signed by the server: EIO within the bound
            assert info.value.errno == errno.EIO
            assert time.monotonic() - start < EIO_BOUND
            with pytest.raises(OSError) as info:
                os.listdir(Path(m.mountpoint, MEDIUM))  # never listed: the registry is gone
            assert info.value.errno == errno.EIO
            assert len(_files(Path(m.mountpoint, "calexp"))) == remote.demo.dataset_counts["calexp"]
            assert _read(first) == expected, "what was read before stays readable"
        finally:
            remote.server.start("demo")
        assert len(_read(second)) == second.stat().st_size
        assert len(os.listdir(Path(m.mountpoint, MEDIUM))) == 1


# Run and prefetch


def test_run_over_a_client_server_butler(remote, storage, tmp_path):
    program = (
        "import hashlib, sys; "
        'print(*(hashlib.sha256(open(p, "rb").read()).hexdigest() for p in sys.argv[1:3]), sys.argv[3])'
    )
    workdir = tmp_path / "work"
    result = run_cli(
        "run",
        LABEL,
        "-c",
        remote.demo.defaults,
        "-i",
        "img=raw",
        "-i",
        "bias=bias:copy",
        "-i",
        "rawuri=raw:uri",
        "-w",
        "instrument='LSSTCam-imSim' AND detector=0",
        "--workdir",
        str(workdir),
        "--",
        sys.executable,
        "-c",
        program,
        "{img}",
        "{bias}",
        "{rawuri}",
    )
    assert result.returncode == 0, result.stderr + result.stdout
    from lsst.daf.butler import Butler

    butler = Butler.from_config(remote.demo.root)
    try:
        outputs = sorted(workdir.rglob("stdout.txt"))
        assert len(outputs) == len(remote.demo.visits)
        for stdout in outputs:
            manifest = json.loads((stdout.parent / "manifest.json").read_text())
            digests = stdout.read_text().split()
            by_name = {i["name"]: i for i in manifest["inputs"]}
            for name, digest in zip(("img", "bias"), digests[:2], strict=True):
                ref = butler.get_dataset(uuid.UUID(by_name[name]["dataset_id"]))
                data = butler.getURI(ref).read()
                assert hashlib.sha256(data).hexdigest() == digest, name
            raw_id = by_name["rawuri"]["dataset_id"]
            assert raw_id == by_name["img"]["dataset_id"]
            assert digests[2] == f"{remote.url}/v1/dataset/{raw_id}/download"
    finally:
        butler.close()


@pytest.mark.parametrize(
    ("arguments", "needles"),
    [
        ({"inputs": ["img=calexp:direct"]}, ["input img", "only by URL", "use mount"]),
        ({"inputs": ["img=calexp"], "outputs": ["x=x.txt"], "output_run": "u/x"}, ["read-only", "--output"]),
    ],
)
def test_run_refuses_direct_staging_and_outputs(remote, tmp_path, arguments, needles):
    from wrapper.run import RunOptions, plan_run

    workdir = tmp_path / "w"
    options = RunOptions(
        remote.url, [remote.demo.defaults], command=["true"], workdir=str(workdir), **arguments
    )
    with pytest.raises(UsageError) as info:
        plan_run(options)
    for needle in needles:
        assert needle in str(info.value), info.value
    assert not workdir.exists(), "nothing may be created before the refusal"


def test_cli_cache_prefetch(remote, storage, mountpoint, tmp_path):
    cache = tmp_path / "prefetched"
    result = run_cli(
        "cache", "prefetch", remote.url, "-c", EXTRA_RUN, "-t", MEDIUM, "--cache-dir", str(cache), check=True
    )
    assert f"{len(MEDIUM_DETECTORS)} remote artifacts" in result.stdout, result.stdout
    with _mount(
        remote.url, mountpoint, tmp_path, [EXTRA_RUN], dataset_types=[MEDIUM], cache_dir=str(cache)
    ) as m:
        assert all(len(_read(p)) == MEDIUM_SIZE for p in _medium_paths(m))
        assert _stats(m)["requests"] == 0, _stats(m)


# Errors a user can make


@pytest.mark.parametrize(
    ("case", "needles"),
    [
        ("no token", ["set BUTLER_RUBIN_ACCESS_TOKEN"]),
        ("unknown repository", ["repository name", "no repository of that name"]),
        ("posix datastore", ["not a POSIX one"]),
    ],
)
def test_clear_errors(remote, monkeypatch, case, needles):
    from butlerfs.registry import RepoIndex

    repo = remote.url
    if case == "no token":
        monkeypatch.delenv("BUTLER_RUBIN_ACCESS_TOKEN")
    elif case == "unknown repository":
        repo = remote.server.url("nope")
    else:
        repo = remote.server.url("posix")
    with pytest.raises(UsageError) as info:
        RepoIndex(repo, [remote.demo.defaults])
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("case", ["remote extra missing", "unreachable"])
def test_cli_errors_are_one_line(remote, mountpoint, tmp_path, case):
    env = dict(os.environ)
    repo = remote.url
    if case == "unreachable":
        repo = f"http://127.0.0.1:{free_port()}/api/butler/repo/demo"
        # lsst.resources retries a refused connection for 15 s or more; the message is the same.
        env.update(LSST_HTTP_BACKOFF_MIN="0.01", LSST_HTTP_BACKOFF_MAX="0.02")
        needles = ["cannot reach the Butler server", "Connection refused"]
    else:
        shadow = tmp_path / "shadow" / "httpx2"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text(
            'raise ModuleNotFoundError("No module named httpx2", name="httpx2")\n'
        )
        env["PYTHONPATH"] = str(shadow.parent)
        needles = ["remote extra", "butlerfs[remote]"]
    result = run_cli("mount", repo, str(mountpoint), "-c", remote.demo.defaults, env=env)
    _assert_clean_error(result, *needles)
    _assert_not_mounted(mountpoint)


@pytest.mark.parametrize(
    ("query", "lifetime"),
    [
        (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-Signature=ab",
            3600,
        ),
        ("X-Goog-Date=20260101T000000Z&X-Goog-Expires=900&X-Goog-Signature=ab", 900),
        ("AWSAccessKeyId=k&Signature=s&Expires={expires}", 600),
        ("nothing=here", 3600),  # unstated: the server's hour
    ],
)
def test_stated_lifetime_of_signed_urls(query, lifetime):
    from butlerfs.http_store import _stated_lifetime

    url = "https://storage.example/bucket/key?" + query.format(expires=int(time.time()) + 600)
    assert _stated_lifetime(url) == pytest.approx(lifetime, abs=2)
