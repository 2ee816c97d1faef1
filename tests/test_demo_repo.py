"""Tests of the DP0.2-shaped demo repository and of the project's file-artifact formatter."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
from lsst.daf.butler import Butler, Config, DatasetRef, DatasetType, FileDataset, Timespan
from lsst.resources import ResourcePath

from butlerfs import demo
from butlerfs.demo import DemoSummary, make_demo_repo
from butlerfs.formatter import FileArtifactFormatter, put_source_extension, storage_class_config

VISITS, DETECTORS, SIZE = 2, 2, 256
N = VISITS * DETECTORS
EXPECTED_COUNTS = {
    "raw": N,
    "bias": DETECTORS,
    "flat": DETECTORS,
    "postISRCCD": N,
    "calexp": N,  # found first in the defaults chain; one more is shadowed by the rerun
    "calexpBackground": N,
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoSummary, Butler]:
    root = tmp_path_factory.mktemp("demo") / "repo"
    summary = make_demo_repo(str(root), visits=VISITS, detectors=DETECTORS, image_size=SIZE)
    return summary, Butler.from_config(str(root))


def _all_refs(butler: Butler, dataset_type: str) -> list[DatasetRef]:
    return butler.query_datasets(dataset_type, collections="*", find_first=False, limit=None, explain=False)


def _records(butler: Butler, refs: list[DatasetRef]) -> dict:
    """Datastore records (path, formatter, component, file_size) per dataset ID."""
    (data,) = butler._datastore.export_records(refs).values()
    return {ref_id: next(iter(tables.values())) for ref_id, tables in data.records.items()}


def _artifact_size(uri: ResourcePath) -> int:
    """Size of an artifact, looking inside the Zip file for ``#zip-path=`` URIs."""
    frag = uri.unquoted_fragment
    if frag.startswith("zip-path="):
        with zipfile.ZipFile(uri.replace(fragment="").ospath) as zf:
            return zf.getinfo(frag.partition("=")[2]).file_size
    return uri.size()


def test_summary(repo: tuple[DemoSummary, Butler]) -> None:
    summary, _ = repo
    assert summary.dataset_counts == EXPECTED_COUNTS
    assert summary.visits == [demo.FIRST_VISIT, demo.FIRST_VISIT + demo.VISIT_STEP]
    assert summary.detectors == [0, 1]
    assert (summary.zip_dataset_type, summary.disassembled_dataset_type) == ("calexpBackground", "postISRCCD")
    assert summary.collections == {
        demo.CALIB_RUN: "RUN",
        demo.CALIB: "CALIBRATION",
        demo.RAW_RUN: "RUN",
        demo.ISR_RUN: "RUN",
        demo.CALEXP_RUN: "RUN",
        demo.RERUN_RUN: "RUN",
        demo.RUNS_CHAIN: "CHAINED",
        demo.DEFAULTS: "CHAINED",
    }


def test_dataset_counts(repo: tuple[DemoSummary, Butler]) -> None:
    _, butler = repo
    names = {dt.name for dt in butler.registry.queryDatasetTypes("*")}
    assert names == set(EXPECTED_COUNTS)
    for name, count in EXPECTED_COUNTS.items():
        assert len(_all_refs(butler, name)) == count + (name == "calexp"), name
    assert butler.get_dataset_type("calexp").storageClass_name == "ExposureF"
    assert butler.get_dataset_type("raw").storageClass_name == "Exposure"
    assert butler.get_dataset_type("bias").isCalibration()


def test_dimension_records(repo: tuple[DemoSummary, Butler]) -> None:
    summary, butler = repo
    det = butler.query_dimension_records("detector", instrument=demo.INSTRUMENT)
    assert sorted((d.id, d.full_name) for d in det) == [(0, "R01_S00"), (1, "R01_S01")]
    filters = butler.query_dimension_records("physical_filter", instrument=demo.INSTRUMENT)
    assert {f.band for f in filters} == set("ugrizy")
    # visit_detector_region rows exist, so {visit, detector} data IDs expand.
    ids = butler.query_data_ids(
        ["visit", "detector"], instrument=demo.INSTRUMENT, with_dimension_records=True
    )
    assert len(ids) == N
    for data_id in ids:
        visit, vdr = data_id.records["visit"], data_id.records["visit_detector_region"]
        assert visit is not None and vdr is not None and vdr.region is not None
        assert visit.region.contains(vdr.region)
    exposures = butler.query_dimension_records("exposure", instrument=demo.INSTRUMENT)
    assert sorted(e.id for e in exposures) == summary.visits


def test_chain_find_first(repo: tuple[DemoSummary, Butler]) -> None:
    summary, butler = repo
    assert butler.collections.get_info(demo.DEFAULTS).children == (demo.RUNS_CHAIN, demo.RAW_RUN, demo.CALIB)
    assert butler.collections.get_info(demo.RUNS_CHAIN).children == (
        demo.RERUN_RUN,
        demo.CALEXP_RUN,
        demo.ISR_RUN,
    )
    found = butler.query_datasets("calexp", collections=demo.DEFAULTS, limit=None)
    assert len(found) == N
    shadowed = {k: summary.shadowed[k] for k in ("visit", "detector")}
    for ref in found:
        is_shadowed = {k: ref.dataId[k] for k in shadowed} == shadowed
        assert ref.run == (demo.RERUN_RUN if is_shadowed else demo.CALEXP_RUN)
    first = butler.find_dataset("calexp", summary.shadowed, collections=demo.DEFAULTS)
    original = butler.find_dataset("calexp", summary.shadowed, collections=demo.CALEXP_RUN)
    assert first is not None and original is not None
    assert first.run == demo.RERUN_RUN and first.id != original.id
    assert butler.getURI(first) != butler.getURI(original)


def test_calib_lookup(repo: tuple[DemoSummary, Butler]) -> None:
    summary, butler = repo
    visit = butler.registry.expandDataId(instrument=demo.INSTRUMENT, visit=summary.visits[-1])
    span = visit.timespan
    assert span is not None
    for collection in (demo.CALIB, demo.DEFAULTS):
        for name in ("bias", "flat"):
            ref = butler.find_dataset(
                name, instrument=demo.INSTRUMENT, detector=1, collections=collection, timespan=span
            )
            assert ref is not None and ref.run == demo.CALIB_RUN
    long_ago = Timespan(Time("2000-01-01", scale="tai"), Time("2000-01-02", scale="tai"))
    assert (
        butler.find_dataset(
            "bias", instrument=demo.INSTRUMENT, detector=1, collections=demo.CALIB, timespan=long_ago
        )
        is None
    )
    refs = butler.query_datasets("flat", collections=demo.CALIB, find_first=False, limit=None)
    assert len(refs) == DETECTORS


def test_every_artifact_exists_with_recorded_size(repo: tuple[DemoSummary, Butler]) -> None:
    _, butler = repo
    for name in EXPECTED_COUNTS:
        refs = _all_refs(butler, name)
        records = _records(butler, refs)
        for ref in refs:
            uris = butler.getURIs(ref)
            by_component = dict(uris.componentURIs) if uris.primaryURI is None else {None: uris.primaryURI}
            if name != "postISRCCD":
                assert butler.getURI(ref) == uris.primaryURI
            recs = {rec.component: rec for rec in records[ref.id]}
            assert set(recs) == set(by_component)
            for component, uri in by_component.items():
                assert recs[component].file_size > 0
                assert _artifact_size(uri) == recs[component].file_size, uri


def test_formatters_are_obs_base_names(repo: tuple[DemoSummary, Butler]) -> None:
    _, butler = repo
    for name in EXPECTED_COUNTS:
        refs = _all_refs(butler, name)
        for recs in _records(butler, refs).values():
            for rec in recs:
                key = f"{name}.{rec.component}" if rec.component else name
                assert rec.formatter == demo.FORMATTERS[key]
                assert rec.formatter.startswith("lsst.obs.")


def test_calexp_fits_layout(repo: tuple[DemoSummary, Butler]) -> None:
    _, butler = repo
    for ref in butler.query_datasets("calexp", collections=demo.CALEXP_RUN, limit=None):
        with fits.open(butler.getURI(ref).ospath) as hdul:
            assert len(hdul) == 4
            assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
            primary = hdul[0].header
            assert hdul[0].data is None
            assert primary["INSTRUME"] == demo.INSTRUMENT
            assert primary["VISIT"] == ref.dataId["visit"]
            assert primary["DETECTOR"] == ref.dataId["detector"]
            assert primary["FILTER"] == ref.dataId["physical_filter"]
            assert primary["BAND"] == ref.dataId["band"]
            assert primary["HIERARCH LSST BUTLER ID"] == str(ref.id)
            assert hdul["IMAGE"].data.dtype.name == "float32"
            assert hdul["MASK"].data.dtype.name == "int32"
            assert hdul["VARIANCE"].data.shape == (SIZE, SIZE)
            wcs = WCS(hdul["IMAGE"].header)
            assert wcs.has_celestial
            ra, dec = wcs.pixel_to_world_values(SIZE / 2, SIZE / 2)
            assert 55 < ra < 70 and -45 < dec < -30
            sky = float(primary["SKYLEVEL"])
            image = hdul["IMAGE"].data
            assert abs(float(sorted(image.ravel())[image.size // 2]) - sky) < 0.05 * sky
            assert image.max() > sky + 100 * sky**0.5  # bright stars


def test_raw_and_postisr(repo: tuple[DemoSummary, Butler]) -> None:
    _, butler = repo
    ref = butler.query_datasets("raw", collections=demo.RAW_RUN, limit=1)[0]
    with fits.open(butler.getURI(ref).ospath) as hdul:
        assert hdul[1].data.dtype.kind in "ui" and hdul[1].data.min() > 10000
        assert hdul[0].header["EXPID"] == ref.dataId["exposure"]
    for ref in butler.query_datasets("postISRCCD", collections=demo.DEFAULTS, limit=None):
        uris = butler.getURIs(ref)
        assert uris.primaryURI is None
        assert set(uris.componentURIs) == {"image", "mask", "variance"}
        for component, uri in uris.componentURIs.items():
            assert f"postISRCCD.{component}/" in uri.path
            with fits.open(uri.ospath) as hdul:
                assert len(hdul) == 1 and hdul[0].data.shape == (SIZE, SIZE)
                assert hdul[0].header["HIERARCH LSST BUTLER COMPONENT"] == component
        with pytest.raises(RuntimeError):
            butler.getURI(ref)


def test_zip_ingested_backgrounds(repo: tuple[DemoSummary, Butler]) -> None:
    _, butler = repo
    refs = butler.query_datasets("calexpBackground", collections=demo.DEFAULTS, limit=None)
    assert len(refs) == N
    zips = set()
    for ref in refs:
        uri = butler.getURI(ref)
        assert uri.unquoted_fragment.startswith("zip-path=")
        zip_uri = uri.replace(fragment="")
        zips.add(zip_uri)
        with zipfile.ZipFile(zip_uri.ospath) as zf:
            data = zf.read(uri.unquoted_fragment.partition("=")[2])
        with fits.open(io.BytesIO(data)) as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
            assert hdul[0].header["HIERARCH LSST BUTLER ID"] == str(ref.id)
    assert len(zips) == 1 and "/zips/" in next(iter(zips)).path


def test_refuses_existing_root_then_force_rebuilds_identically(tmp_path: Path) -> None:
    root = str(tmp_path / "tiny")

    def build(force: bool = False) -> DemoSummary:
        return make_demo_repo(root, visits=1, detectors=1, image_size=64, force=force)

    build()
    butler = Butler.from_config(root)
    ref = butler.query_datasets("calexp", collections=demo.CALEXP_RUN, limit=1)[0]
    digest = hashlib.md5(Path(butler.getURI(ref).ospath).read_bytes()).hexdigest()
    del butler
    with pytest.raises(FileExistsError):
        build()
    build(force=True)
    butler = Butler.from_config(root)
    again = butler.find_dataset("calexp", ref.dataId, collections=demo.CALEXP_RUN)
    assert again is not None and again.id == ref.id  # UUIDv5: same data ID + run, same ID
    assert hashlib.md5(Path(butler.getURI(again).ospath).read_bytes()).hexdigest() == digest


def test_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        make_demo_repo(str(tmp_path / "r"), detectors=190)
    assert not (tmp_path / "r").exists()


def test_separate_datastore_root(tmp_path: Path) -> None:
    root, store = tmp_path / "repo", tmp_path / "store"
    summary = make_demo_repo(str(root), visits=1, detectors=1, image_size=64, datastore_root=str(store))
    assert summary.datastore_root == ResourcePath(store, forceDirectory=True).geturl()
    butler = Butler.from_config(str(root))
    for name in EXPECTED_COUNTS:
        for ref in _all_refs(butler, name):
            for uri in butler.getURIs(ref).iter_all():
                assert uri.ospath.startswith(str(store) + "/")
    assert sorted(p.name for p in root.iterdir()) == ["butler.yaml", "gen3.sqlite3"]


def test_file_artifact_formatter(tmp_path: Path) -> None:
    config = storage_class_config()
    config["datastore"]["formatters"]["thingFits"] = {
        "formatter": FileArtifactFormatter.name(),
        "parameters": {"extension": ".fits"},
    }
    Butler.makeRepo(str(tmp_path / "repo"), config=Config(config))
    butler = Butler.from_config(str(tmp_path / "repo"), writeable=True, run="out")
    butler.registry.insertDimensionData("instrument", {"name": "Cam"})
    for name in ("thing", "thingFits", "thingIngested"):
        butler.registry.registerDatasetType(
            DatasetType(name, ["instrument"], "ButlerfsFile", universe=butler.dimensions)
        )
    src = tmp_path / "catalog.ecsv"
    src.write_text("# %ECSV 1.0\na b\n1 2\n")

    with put_source_extension(src) as uri:
        ref = butler.put(uri, "thing", instrument="Cam")
    stored = butler.getURI(ref)
    assert stored.getExtension() == ".ecsv" and stored.read() == src.read_bytes()
    assert butler.get(ref) == stored  # get() returns the URI, reads nothing

    ref = butler.put(str(src), "thingFits", instrument="Cam")
    assert butler.getURI(ref).getExtension() == ".fits"

    data_id = butler.registry.expandDataId(instrument="Cam")
    ref = DatasetRef(butler.get_dataset_type("thingIngested"), data_id, run="out")
    butler.ingest(FileDataset(path=str(src), refs=[ref], formatter=FileArtifactFormatter), transfer="copy")
    assert butler.getURI(ref).path.endswith(".ecsv") and butler.get(ref) == butler.getURI(ref)
    assert src.exists()


def test_file_artifact_formatter_predicts_the_extension_at_rest(tmp_path: Path) -> None:
    """Without a record (a quantum-backed run's outputs), the artifact is found with its extension."""
    Butler.makeRepo(str(tmp_path / "repo"), config=Config(storage_class_config()))
    butler = Butler.from_config(str(tmp_path / "repo"), writeable=True, run="out")
    butler.registry.insertDimensionData("instrument", {"name": "Cam"})
    butler.registry.registerDatasetType(
        DatasetType("thing", ["instrument"], "ButlerfsFile", universe=butler.dimensions)
    )
    src = tmp_path / "catalog.fits.gz"
    src.write_bytes(b"not really gzip")
    with put_source_extension(src) as uri:
        ref = butler.put(uri, "thing", instrument="Cam")
    datastore = butler._datastore  # type: ignore[attr-defined]
    ((location, info),) = datastore._get_expected_dataset_locations_info(ref)
    assert location.uri == butler.getURI(ref) and location.uri.getExtension() == ".fits.gz"
    assert info.formatter.endswith("FileArtifactFormatter")
    missing = DatasetRef(ref.datasetType, ref.dataId, run="other")
    ((location, _),) = datastore._get_expected_dataset_locations_info(missing)
    assert location.uri.getExtension() == ""  # nothing written there: no extension to find
