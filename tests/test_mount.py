"""A real FUSE mount of the demo repository, used by real tools."""

from __future__ import annotations

import concurrent.futures
import errno
import filecmp
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import DEFAULTS, require, require_tool

pytestmark = pytest.mark.fuse

ZIPPED = "calexpBackground"  # the demo ingests these with butler ingest-zip
DISASSEMBLED = "postISRCCD"  # the demo stores these one artifact per component


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _calexps(m) -> list[Path]:
    return sorted(Path(m.mountpoint, "calexp").glob("instrument_*/detector_*/visit_*/calexp_*.fits"))


# The tests taking mounted_any / any_demo run once per registry database (SQLite, PostgreSQL).


def test_layout_visible_to_find_ls_stat(mounted_any, any_demo):
    mounted, demo = mounted_any, any_demo
    top = sorted(os.listdir(mounted.mountpoint))
    assert {"calexp", "raw", "bias", "flat"} <= set(top)
    found = subprocess.run(
        ["find", mounted.mountpoint, "-type", "f"], capture_output=True, text=True, check=True
    )
    paths = found.stdout.split()
    assert len(paths) >= demo.dataset_counts["calexp"]
    assert all(all(c.isalnum() or c in "/._-" for c in p) for p in paths), "unsafe characters in a path"
    listing = subprocess.run(["ls", "-lR", mounted.mountpoint], capture_output=True, text=True, check=True)
    assert "calexp_LSSTCam-imSim_" in listing.stdout
    calexps = _calexps(mounted)
    assert len(calexps) == demo.dataset_counts["calexp"]
    st = os.stat(calexps[0])
    assert st.st_size > 0 and st.st_mode & 0o777 == 0o644
    assert st.st_mtime > 1.5e9  # the ingest date, not the epoch
    assert os.stat(Path(mounted.mountpoint, "calexp")).st_mode & 0o777 == 0o755


def test_bytes_equal_retrieve_artifacts(mounted, demo, tmp_path):
    out = tmp_path / "retrieved"
    out.mkdir()
    for dataset_type in ("calexp", "raw", "bias"):
        subprocess.run(
            [
                str(Path(os.sys.executable).parent / "butler"),
                "retrieve-artifacts",
                demo.root,
                f"{out}/",
                "--collections",
                DEFAULTS,
                "--dataset-type",
                dataset_type,
                "--find-first",
                "--no-preserve-path",
            ],
            check=True,
            capture_output=True,
        )
    retrieved = sorted(out.glob("*.fits"))
    mounted_files = [p for t in ("calexp", "raw", "bias") for p in _files(Path(mounted.mountpoint, t))]
    assert len(retrieved) == len(mounted_files) > 0
    # retrieve-artifacts names files after the datastore path: match them through the uri xattr.
    by_basename = {os.getxattr(p, "user.butler.uri").decode().rsplit("/", 1)[-1]: p for p in mounted_files}
    for r in retrieved:
        assert filecmp.cmp(r, by_basename[r.name], shallow=False), r.name


def test_copy_out_flat_and_recursive(mounted, tmp_path):
    dest = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(Path(mounted.mountpoint, "calexp")), str(dest)], check=True)
    copied = _files(dest)
    assert len(copied) == len(_calexps(mounted))
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in _files(Path(mounted.mountpoint)):
        target = flat / p.name
        assert not target.exists(), f"file names are not unique when flattened: {p.name}"
        target.write_bytes(p.read_bytes())


def test_xattrs(mounted, demo):
    require_tool("getfattr")
    path = _calexps(mounted)[0]
    out = subprocess.run(
        ["getfattr", "-d", "-m", "user.butler", str(path)], capture_output=True, text=True, check=True
    ).stdout
    for key in ("dataset_id", "dataset_type", "run", "data_id", "uri"):
        assert f"user.butler.{key}=" in out
    data_id = json.loads(os.getxattr(path, "user.butler.data_id"))
    assert data_id["instrument"] == "LSSTCam-imSim"
    assert path.parent.name == f"visit_{data_id['visit']}"
    assert os.getxattr(path, "user.butler.dataset_type") == b"calexp"
    uri = os.getxattr(path, "user.butler.uri").decode()
    assert uri.startswith("file://") and os.path.getsize(uri[len("file://") :]) == path.stat().st_size


def test_astropy_fitsverify_and_sextractor_read_mounted_paths(mounted, tmp_path):
    from astropy.io import fits

    path = _calexps(mounted)[0]
    with fits.open(path) as hdul:
        assert [h.name for h in hdul[1:4]] == ["IMAGE", "MASK", "VARIANCE"]
        assert hdul[1].data.shape[0] > 0
    verify = subprocess.run([require_tool("fitsverify"), "-q", str(path)], capture_output=True, text=True)
    assert verify.returncode == 0 and "OK" in verify.stdout, verify.stdout + verify.stderr
    sex = require_tool("source-extractor")
    catalog = tmp_path / "cat.txt"
    params = tmp_path / "sex.param"
    params.write_text("NUMBER\nX_IMAGE\nY_IMAGE\nFLUX_AUTO\n")
    result = subprocess.run(
        [
            sex,
            f"{path}[1]",
            "-CATALOG_NAME",
            str(catalog),
            "-CATALOG_TYPE",
            "ASCII",
            "-PARAMETERS_NAME",
            str(params),
            "-FILTER",
            "N",
            "-CHECKIMAGE_TYPE",
            "NONE",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in catalog.read_text().splitlines() if not line.startswith("#")]
    assert len(rows) > 20, "SExtractor found too few sources in a synthetic field of stars"


def test_writes_fail_with_erofs(mounted):
    path = _calexps(mounted)[0]
    directory = path.parent
    attempts = [
        lambda: open(path, "r+b"),
        lambda: open(path, "ab"),
        lambda: open(directory / "new.fits", "wb"),
        lambda: os.unlink(path),
        lambda: os.mkdir(directory / "sub"),
        lambda: os.rename(path, directory / "moved.fits"),
        lambda: os.chmod(path, 0o644),
        lambda: os.truncate(path, 0),
        lambda: os.setxattr(path, "user.test", b"1"),
        lambda: os.utime(path, (0, 0)),
        lambda: os.symlink("x", directory / "link"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS, info.value


def test_zip_and_disassembled_datasets_are_readable(mounted_any):
    mounted = mounted_any
    from astropy.io import fits

    for dataset_type in (ZIPPED, DISASSEMBLED):
        files = _files(Path(mounted.mountpoint, dataset_type))
        assert files, dataset_type
        for f in files:
            uri = os.getxattr(f, "user.butler.uri").decode()
            with fits.open(f) as hdul:
                assert len(hdul) >= 1
            if dataset_type == ZIPPED:
                assert "zip-path" in uri
    parts = _files(Path(mounted.mountpoint, DISASSEMBLED))
    components = {os.getxattr(p, "user.butler.component").decode() for p in parts}
    assert len(components) >= 2
    assert all(p.name.startswith(f"{DISASSEMBLED}.") for p in parts)


def test_concurrent_readers_get_the_right_bytes(mounted):
    paths = _files(Path(mounted.mountpoint))[:16]
    expected = {
        p: Path(os.getxattr(p, "user.butler.uri").decode().partition("#")[0][len("file://") :]) for p in paths
    }

    def read(p: Path) -> bool:
        if "#" in os.getxattr(p, "user.butler.uri").decode():
            return True  # zip members are compared in their own test
        data = b""
        with open(p, "rb", buffering=0) as stream:
            while chunk := stream.read(65536 + 7):  # odd size: unaligned requests
                data += chunk
        return data == expected[p].read_bytes()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, paths * 2))


def test_dataset_ingested_while_mounted_appears_after_refresh(any_demo, mountpoint, tmp_path):
    demo = any_demo
    from conftest import require_fuse
    from lsst.daf.butler import Butler, DatasetType

    import butlerfs

    require_fuse()
    butler = Butler.from_config(demo.root, writeable=True)
    run = "u/test/late"
    butler.collections.register(run)
    dataset_type = DatasetType(
        "lateArrival", ["instrument", "detector"], "ButlerfsFile", universe=butler.dimensions
    )
    butler.registry.registerDatasetType(dataset_type)
    try:
        with butlerfs.mount(
            demo.root, str(mountpoint), collections=[run], dataset_types=["lateArrival"], refresh=1.0
        ) as m:
            top = Path(m.mountpoint, "lateArrival")
            assert os.listdir(top) == []
            source = tmp_path / "late.txt"
            source.write_text("late\n")
            from butlerfs.formatter import put_source_extension

            with put_source_extension(source) as uri:
                butler.put(uri, dataset_type, instrument="LSSTCam-imSim", detector=0, run=run)
            time.sleep(1.5)
            files = _files(top)
            assert [f.name for f in files] == ["lateArrival_LSSTCam-imSim_0.txt"]
            assert files[0].read_text() == "late\n"
    finally:
        butler.removeRuns([run])
        butler.registry.removeDatasetType("lateArrival")


def test_runs_on_libfuse_3_and_says_so(mounted):
    from butlerfs.mounting import _state_file

    # libfuse2 is installed beside fuse3 by make setup: the pin must win over mfusepy's order.
    stats = json.loads(os.getxattr(mounted.mountpoint, "user.butlerfs.stats"))
    assert stats["libfuse"].startswith("3."), stats
    log = Path(_state_file(mounted.mountpoint, "log")).read_text()
    assert f"on libfuse {stats['libfuse']} (" in log and "libfuse3.so" in log
    # libfuse 3.14.0 logs this false error when max_idle_threads is left unset. The log of a
    # mount point gathers its mounts: this one's starts at its last "Serving" line.
    this_mount = log[log.rindex("Serving ") :]
    assert "Ignoring invalid" not in this_mount, this_mount


def test_libfuse_2_is_refused_with_a_clear_message(tmp_path):
    import sys
    from ctypes.util import find_library

    require(find_library("fuse") is not None, "libfuse2 (installed by make setup beside fuse3)")
    code = "from butlerfs.fuse_ops import libfuse_version; libfuse_version()"
    env = {**os.environ, "FUSE_LIBRARY_NAME": "fuse"}
    env.pop("FUSE_LIBRARY_PATH", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "butlerfs needs libfuse 3, but libfuse.so.2 is libfuse 2." in result.stderr, result.stderr


def test_flat_layout_and_a_remount_listed_from_the_index(demo, mountpoint, tmp_path):
    from conftest import require_fuse

    import butlerfs

    require_fuse()
    options = dict(collections=[DEFAULTS], layout="flat", mtime="listed", cache_dir=str(tmp_path / "cache"))

    def walk(m) -> tuple[dict[str, tuple[int, float]], dict]:
        root = Path(m.mountpoint)
        files = {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime) for p in _files(root)}
        return files, json.loads(os.getxattr(m.mountpoint, "user.butlerfs.stats"))

    with butlerfs.mount(demo.root, str(mountpoint), **options) as m:
        first, stats = walk(m)
    assert stats["loads_registry"] >= len(demo.dataset_counts) and not stats.get("loads_index")
    calexps = [p for p in first if p.startswith("calexp/")]
    assert len(calexps) == demo.dataset_counts["calexp"]
    assert all(p.count("/") == 3 for p in calexps), "calexp/instrument_I/detector_D/FILE"
    with butlerfs.mount(demo.root, str(mountpoint), **options) as m:
        again, stats = walk(m)
    assert again == first, "the same names, sizes and mtimes"
    assert not stats.get("loads_registry") and stats["loads_index"] >= len(demo.dataset_counts)
