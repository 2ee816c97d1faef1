"""The source layer without FUSE: layout, find-first, calibrations, refresh, reads, threads."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import subprocess
import time

import pytest
from conftest import DEFAULTS, require_tool

from butlerfs.errors import FsError
from butlerfs.registry import RepoIndex
from butlerfs.source import ButlerSource, Directory, File


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _walk(source: ButlerSource, path: str = "/") -> dict[str, File]:
    found: dict[str, File] = {}
    for name, node in source.listdir(path):
        child = f"{path.rstrip('/')}/{name}"
        if isinstance(node, File):
            found[child] = node
        else:
            found.update(_walk(source, child))
    return found


@pytest.fixture(params=[20_000, 0], ids=["subtree", "per-level"])
def source(request, demo):
    """Both listing strategies: whole subtrees at once, and one dimension per query."""
    index = RepoIndex(demo.root, [DEFAULTS])
    src = ButlerSource(index, refresh=60.0, subtree_limit=request.param, clock=FakeClock())
    yield src
    src.close()


def test_top_level_lists_dataset_types(source, demo):
    names = [name for name, _ in source.listdir("/")]
    assert names == sorted(demo.dataset_counts)


def test_every_dataset_appears_once_with_its_record_size(source, demo):
    files = _walk(source)
    ids = {(f.dataset.id, f.artifact.component) for f in files.values()}
    assert len(ids) == len(files)
    for path, f in files.items():
        assert source.getattr(path).size == f.size == f.artifact.size > 0
    calexps = [p for p in files if p.startswith("/calexp/")]
    # The demo's rerun shadows one calexp: find-first shows one per data ID.
    assert len(calexps) == len(demo.visits) * len(demo.detectors)


def test_find_first_picks_the_rerun(source, demo):
    s = demo.shadowed
    path = (
        f"/calexp/instrument_{s['instrument']}/detector_{s['detector']}/visit_{s['visit']}/"
        f"calexp_{s['instrument']}_{s['detector']}_{s['visit']}.fits"
    )
    node = source.lookup(path)
    assert isinstance(node, File)
    assert node.dataset.run.endswith("rerun")


def test_calibrations_found_through_the_calibration_collection(source, demo):
    for detector in demo.detectors:
        node = source.lookup(
            f"/bias/instrument_LSSTCam-imSim/detector_{detector}/bias_LSSTCam-imSim_{detector}.fits"
        )
        assert isinstance(node, File) and "calib" in node.dataset.run


def test_xattrs_describe_the_dataset(source):
    path, node = next(iter(_walk(source, "/raw").items()))
    xattrs = source.xattrs(path)
    assert xattrs["user.butler.dataset_id"] == str(node.dataset.id).encode()
    assert json.loads(xattrs["user.butler.data_id"]) == dict(node.dataset.data_id)
    assert xattrs["user.butler.dataset_type"] == b"raw"
    assert source.xattrs("/raw") == {}


def test_errors_carry_errno(source):
    with pytest.raises(FsError) as info:
        source.lookup("/calexp/instrument_Nope")
    assert info.value.errno == errno.ENOENT
    path = next(iter(_walk(source, "/flat")))
    with pytest.raises(FsError) as info:
        source.lookup(path + "/below")
    assert info.value.errno == errno.ENOTDIR
    with pytest.raises(FsError) as info:
        source.open(path, os.O_RDWR)
    assert info.value.errno == errno.EROFS
    with pytest.raises(FsError) as info:
        source.open("/flat", os.O_RDONLY)
    assert info.value.errno == errno.EISDIR


def test_reads_return_the_artifact_bytes(source):
    for path, node in _walk(source, "/calexp").items():
        handle = source.open(path, os.O_RDONLY)
        try:
            data = source.read(handle, node.size + 100, 0)
            tail = source.read(handle, 1000, node.size - 10)
        finally:
            source.release(handle)
        local = node.artifact.uri[len("file://") :]
        with open(local, "rb") as stream:
            expected = stream.read()
        assert data == expected and tail == expected[-10:]


def test_new_datasets_appear_after_refresh(demo, tmp_path):
    from lsst.daf.butler import Butler, DatasetType

    from butlerfs.formatter import put_source_extension

    butler = Butler.from_config(demo.root, writeable=True)
    run = "u/test/refresh"
    butler.collections.register(run)
    dataset_type = DatasetType(
        "refreshTest", ["instrument", "detector"], "ButlerfsFile", universe=butler.dimensions
    )
    butler.registry.registerDatasetType(dataset_type)
    clock = FakeClock()
    src = ButlerSource(RepoIndex(demo.root, [run], ["refreshTest"]), refresh=10.0, clock=clock)
    try:
        assert src.listdir("/refreshTest") == []
        payload = tmp_path / "x.txt"
        payload.write_text("x")
        with put_source_extension(payload) as uri:
            butler.put(uri, dataset_type, instrument="LSSTCam-imSim", detector=1, run=run)
        assert src.listdir("/refreshTest") == [], "a listing is trusted for the refresh interval"
        clock.now = 11.0
        assert [n for n, _ in src.listdir("/refreshTest")] == ["instrument_LSSTCam-imSim"]
        # A lookup of a name missing from a stale listing also refreshes it.
        with put_source_extension(payload) as uri:
            butler.put(uri, dataset_type, instrument="LSSTCam-imSim", detector=2, run=run)
        clock.now = 30.0
        assert isinstance(src.lookup("/refreshTest/instrument_LSSTCam-imSim/detector_2"), Directory)
    finally:
        src.close()
        butler.removeRuns([run])
        butler.registry.removeDatasetType("refreshTest")


def test_where_constrains_every_listing(demo):
    visit = demo.visits[0]
    src = ButlerSource(
        RepoIndex(
            demo.root, [DEFAULTS], ["calexp"], where=f"instrument = 'LSSTCam-imSim' AND visit = {visit}"
        )
    )
    try:
        files = _walk(src)
        assert len(files) == len(demo.detectors)
        assert all(f"visit_{visit}" in p for p in files)
    finally:
        src.close()


def test_concurrent_listing_and_reading_is_consistent(demo):
    # Many threads race to load the same directories (a Butler is not thread-safe).
    src = ButlerSource(RepoIndex(demo.root, [DEFAULTS]), subtree_limit=0)
    try:
        reference = ButlerSource(RepoIndex(demo.root, [DEFAULTS]))
        expected = sorted(_walk(reference))
        reference.close()

        def walk_and_read(_: int) -> list[str]:
            files = _walk(src)
            for path, node in list(files.items())[:5]:
                handle = src.open(path, os.O_RDONLY)
                assert len(src.read(handle, node.size, 0)) == node.size
                src.release(handle)
            return sorted(files)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(walk_and_read, range(16)))
        assert all(r == expected for r in results)
    finally:
        src.close()


def _resident(path) -> int:
    """Bytes of ``path`` in the page cache (``fincore``)."""
    out = subprocess.run(["fincore", "-b", "-n", "-o", "RES", str(path)], capture_output=True, text=True)
    return int(out.stdout.strip())


@pytest.mark.parametrize("read_ahead", [True, False], ids=["daemon-read-ahead", "off"])
def test_sequential_local_reads_are_read_ahead_by_the_daemon(tmp_path, monkeypatch, read_ahead):
    """A streaming reader gets the next 4 MiB asked of the disk; a header read gets nothing extra."""
    from butlerfs import artifacts

    require_tool("fincore")
    if not read_ahead:
        monkeypatch.setattr(artifacts, "_READ_AHEAD", 0)
    path = tmp_path / "artifact.bin"
    data = os.urandom(16 << 20)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages: evicted, as a user may
    os.close(fd)
    assert _resident(path) == 0
    reader = artifacts._FileRange(str(path))
    os.posix_fadvise(reader._fd, 0, 0, os.POSIX_FADV_RANDOM)  # no kernel read-ahead: only the daemon's
    try:
        buffer = bytearray(128 << 10)
        assert reader.read_into(memoryview(buffer)[:2880], 0) == 2880
        assert _resident(path) < 128 << 10, "a header read must not read ahead"
        # Requests served out of order by the daemon's threads still count as sequential.
        for offset in (0, 256 << 10, 128 << 10, 384 << 10, 512 << 10, 640 << 10, 768 << 10, 896 << 10):
            assert reader.read_into(memoryview(buffer), offset) == len(buffer)
            assert bytes(buffer) == data[offset : offset + len(buffer)]
        expected = (512 << 10) + (4 << 20) if read_ahead else 1 << 20  # advised once 512 KiB were read
        deadline = time.monotonic() + 10
        while _resident(path) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (_resident(path) >= expected) if read_ahead else (_resident(path) == expected)
        # A jump elsewhere is not sequential: it reads what it asks for, nothing more is advised.
        before = _resident(path)
        assert reader.read_into(memoryview(buffer), 12 << 20) == len(buffer)
        assert _resident(path) == before + len(buffer)
    finally:
        reader.close()
