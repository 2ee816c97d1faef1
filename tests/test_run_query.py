"""``butlerfs run`` finds exactly the data IDs ``butler query-datasets --find-first`` lists.

A query with dimension records joins every record table of the data ID, so a dataset whose
data ID lacks one (no ``visit_detector_region`` rows: hand-built repositories, external
instruments) silently dropped out of ``butlerfs run``. These tests copy the session's demo
repository, delete those rows, and compare the executions with what the ``butler`` command
lists, placeholders of implied dimensions and the other inputs included.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, DEFAULTS, require_fuse, run_cli

from wrapper.inputs import InputSpec, find_units

INSTRUMENT = "LSSTCam-imSim"


def _copy_without_regions(demo, target: Path, where: str = "") -> str:
    """Copy the demo repository and delete (some of) its ``visit_detector_region`` rows."""
    shutil.copytree(demo.root, target, symlinks=True)
    with sqlite3.connect(target / "gen3.sqlite3") as db:
        db.execute(f"DELETE FROM visit_detector_region {where}")
        left = db.execute("SELECT COUNT(*) FROM visit_detector_region").fetchone()[0]
    db.close()
    assert left == (0 if not where else len(demo.visits) * len(demo.detectors) - 2)
    return str(target)


@pytest.fixture(scope="module")
def bare(demo, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo repository without any ``visit_detector_region`` row."""
    return _copy_without_regions(demo, tmp_path_factory.mktemp("bare") / "repo")


@pytest.fixture(scope="module")
def partial(demo, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The demo repository missing the ``visit_detector_region`` rows of two data IDs."""
    visit = demo.visits[0]
    where = f"WHERE visit = {visit} AND detector IN ({demo.detectors[0]}, {demo.detectors[-1]})"
    return _copy_without_regions(demo, tmp_path_factory.mktemp("partial") / "repo", where)


def query_datasets(repo: str, dataset_type: str, where: str = "") -> dict[tuple[int, int], dict[str, str]]:
    """Rows of ``butler query-datasets --find-first`` by (visit, detector)."""
    args = [str(BIN / "butler"), "query-datasets", repo, dataset_type, "--collections", DEFAULTS]
    args += ["--find-first", "--limit", "0"]
    if where:
        args += ["--where", where]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=120).stdout
    lines = [line.split() for line in out.splitlines() if line.strip()]
    header = next(i for i, cols in enumerate(lines) if cols[:1] == ["type"])
    names = lines[header]
    rows = [dict(zip(names, cols, strict=True)) for cols in lines[header + 2 :]]
    return {(int(r["visit"]), int(r["detector"])): r for r in rows}


def butlerfs_run(repo: str, work: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    """Run ``butlerfs run`` without the sandbox; return the result and the manifests by (visit, detector)."""
    result = run_cli(
        "run", repo, "-c", DEFAULTS, "--workdir", str(work), "--sandbox", "off", *args, timeout=300
    )
    manifests = {}
    for path in work.glob("instrument_*/detector_*/*/manifest.json"):
        data = json.loads(path.read_text())
        manifests[(data["data_id"]["visit"], data["data_id"]["detector"])] = data
    return result, manifests


@pytest.fixture
def work(tmp_path: Path):
    """A work directory; afterwards nothing may be left mounted under the test's tmp_path."""
    require_fuse()
    yield tmp_path / "work"
    with open("/proc/self/mounts") as mounts:
        left = [line.split()[1] for line in mounts if str(tmp_path) in line.split()[1]]
    for point in left:
        subprocess.run(["umount", "-l", point], check=False)
    assert not left, f"left mounted: {left}"


def test_the_copy_lacks_records(bare):
    """The premise: a query with dimension records finds nothing, ``butler`` lists every calexp."""
    from lsst.daf.butler import Butler

    butler = Butler.from_config(bare)
    kwargs = dict(find_first=True, limit=None, explain=False)
    assert butler.query_datasets("calexp", DEFAULTS, with_dimension_records=True, **kwargs) == []
    assert len(butler.query_datasets("calexp", DEFAULTS, **kwargs)) == len(query_datasets(bare, "calexp"))


def test_run_covers_every_listed_data_id_with_implied_values_and_other_inputs(bare, work):
    listed = query_datasets(bare, "calexp")
    backgrounds = query_datasets(bare, "calexpBackground")
    assert len(listed) >= 6
    result, manifests = butlerfs_run(
        bare,
        work,
        "-i",
        "img=calexp",
        "-i",
        "bg=calexpBackground:uri",
        "-i",
        "bias=bias",
        "--",
        "echo",
        "{dataId.visit}",
        "{dataId.detector}",
        "{dataId.band}",
        "{dataId.physical_filter}",
        "{img}",
        "{bias}",
    )
    assert result.returncode == 0, result.stderr
    assert set(manifests) == set(listed)
    for key, manifest in manifests.items():
        row = listed[key]
        assert manifest["status"] == "ok", manifest["reason"]
        argv = manifest["argv"]
        assert argv[1:5] == [str(key[0]), str(key[1]), row["band"], row["physical_filter"]]
        inputs = {i["name"]: i for i in manifest["inputs"]}
        assert inputs["img"]["dataset_id"] == row["id"]
        assert inputs["bg"]["dataset_id"] == backgrounds[key]["id"]  # the other input, by data ID
        assert inputs["bias"]["dataset_type"] == "bias"  # the calibration, by the visit's timespan
        assert inputs["img"]["staging"] == "mount" and argv[5].endswith(".fits")  # found in the mount


@pytest.mark.parametrize(
    "where",
    [f"instrument = '{INSTRUMENT}' AND visit = {{visit}}", "band = '{band}'"],
    ids=["visit", "band"],
)
def test_where_still_constrains(bare, work, demo, where):
    listed_all = query_datasets(bare, "calexp")
    visit = demo.visits[-1]
    band = next(row["band"] for (v, _), row in listed_all.items() if v == visit)
    where = where.format(visit=visit, band=band)
    listed = query_datasets(bare, "calexp", where)
    assert listed and set(listed) < set(listed_all)
    result, manifests = butlerfs_run(
        bare, work, "-i", "img=calexp", "-w", where, "--", "echo", "{dataId.band}"
    )
    assert result.returncode == 0, result.stderr
    assert set(manifests) == set(listed)
    assert {m["argv"][1] for m in manifests.values()} == {band}


def test_find_units_attaches_the_records_that_exist(partial, demo):
    """Mixed: the data IDs with records keep them all, the others get what exists (no region)."""
    from lsst.daf.butler import Butler

    butler = Butler.from_config(partial)
    specs = [InputSpec.parse("img=calexp"), InputSpec.parse("bias")]
    first, units = find_units(butler, [DEFAULTS], specs)
    listed = query_datasets(partial, "calexp")
    assert [(u.data_id["visit"], u.data_id["detector"]) for u in units] == sorted(
        listed, key=lambda key: (key[1], key[0])
    )  # data ID order (detector, then visit), as before
    bare_keys = {(demo.visits[0], demo.detectors[0]), (demo.visits[0], demo.detectors[-1])}
    for unit in units:
        key = (unit.data_id["visit"], unit.data_id["detector"])
        assert unit.data_id.hasRecords() and not unit.missing
        assert unit.refs["img"].id.hex == listed[key]["id"].replace("-", "")
        assert unit.values["band"] == listed[key]["band"]
        assert unit.data_id.records["visit"] is not None and unit.data_id.timespan is not None
        assert (unit.data_id.records["visit_detector_region"] is None) == (key in bare_keys)
