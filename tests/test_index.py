"""Listings at scale without FUSE: the on-disk index, change detection, the memory limit, the flat layout."""

from __future__ import annotations

import dataclasses
import errno
import logging
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import DEFAULTS

from butlerfs.errors import FsError
from butlerfs.listing import Chunk
from butlerfs.registry import RepoIndex
from butlerfs.source import ButlerSource, Directory, File

INSTRUMENT = "LSSTCam-imSim"


def _walk(source: ButlerSource, path: str = "/") -> dict[str, File]:
    found: dict[str, File] = {}
    for name, node in source.listdir(path):
        child = f"{path.rstrip('/')}/{name}"
        if isinstance(node, File):
            found[child] = node
        else:
            found.update(_walk(source, child))
    return found


def _source(repo: str, collections: list[str], index_dir: Path | None, **kwargs) -> ButlerSource:
    types = kwargs.pop("dataset_types", ())
    return ButlerSource(RepoIndex(repo, collections, types), index_dir=str(index_dir) if index_dir else None,
                        **kwargs)


def _listing(repo: str, collections: list[str], index_dir: Path | None, **kwargs) -> tuple[dict, dict]:
    """Walk a fresh source; return ``{path: (dataset id, run, size)}`` and its counters."""
    source = _source(repo, collections, index_dir, **kwargs)
    try:
        files = {p: (f.dataset.id, f.dataset.run, f.size) for p, f in _walk(source).items()}
        return files, source.memory()
    finally:
        source.close()


def test_remount_lists_from_the_index_without_listing_queries(demo, tmp_path, monkeypatch):
    index = tmp_path / "index"
    first, counters = _listing(demo.root, [DEFAULTS], index, subtree_limit=3)
    assert counters["loads_registry"] > 1 and not counters.get("loads_index")
    again, counters = _listing(demo.root, [DEFAULTS], index, subtree_limit=3)
    assert again == first
    assert not counters.get("loads_registry") and counters["loads_index"] > 1
    # An unchanged state is renewed (a recent "since"); the stored listings stay valid.
    monkeypatch.setattr("butlerfs.source.SINCE_RENEWAL", 0.0)
    for _ in range(2):
        again, counters = _listing(demo.root, [DEFAULTS], index, subtree_limit=3)
        assert again == first and not counters.get("loads_registry")
    # Another query (here another subtree limit) has its own index.
    _, counters = _listing(demo.root, [DEFAULTS], index, subtree_limit=4)
    assert counters["loads_registry"] > 1


def test_memory_limit_drops_pieces_and_loads_them_again(demo, tmp_path):
    index = tmp_path / "index"
    expected, _ = _listing(demo.root, [DEFAULTS], None)
    source = _source(demo.root, [DEFAULTS], index, subtree_limit=2, memory_limit=1)
    try:
        files = {p: (f.dataset.id, f.dataset.run, f.size) for p, f in _walk(source).items()}
        counters = source.memory()
        assert files == expected
        assert counters["evictions"] > 10
        assert counters["listing_bytes"] < 20_000, "only the newest piece (and the small levels) stay"
        again = {p: (f.dataset.id, f.dataset.run, f.size) for p, f in _walk(source).items()}
        assert again == expected
        assert source.memory()["loads_index"] > 10, "dropped pieces come back from the index"
    finally:
        source.close()


def test_flat_layout_drops_the_last_directory(demo):
    default, _ = _listing(demo.root, [DEFAULTS], None)
    flat, _ = _listing(demo.root, [DEFAULTS], None, layout="flat", subtree_limit=2)
    folded = {}
    for path, value in default.items():
        parts = path.split("/")
        if len(parts) > 3:  # a type with dimensions: drop the last dimension's directory
            del parts[-2]
        folded["/".join(parts)] = value
    assert flat == folded
    source = _source(demo.root, [DEFAULTS], None, layout="flat")
    try:
        for path in list(flat)[:20]:
            assert isinstance(source.lookup(path), File)
            assert isinstance(source.lookup(path.rsplit("/", 1)[0]), Directory)
    finally:
        source.close()


def test_a_damaged_index_is_discarded(demo, tmp_path, caplog):
    index = tmp_path / "index"
    expected, _ = _listing(demo.root, [DEFAULTS], index)
    (db,) = index.glob("*.sqlite")
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE nodes SET data = X'42465343000000'")
    with caplog.at_level(logging.WARNING, logger="butlerfs.source"):
        again, counters = _listing(demo.root, [DEFAULTS], index)
    assert again == expected and counters["loads_registry"] >= 1
    assert "Discarding a damaged listing" in caplog.text


def test_a_listing_whose_paths_are_damaged_is_fetched_again(demo, tmp_path, caplog):
    """A stored chunk that decompresses and parses, but whose compressed paths do not."""
    index = tmp_path / "index"
    expected, _ = _listing(demo.root, [DEFAULTS], index)
    (db,) = index.glob("*.sqlite")
    damaged = 0
    with sqlite3.connect(db) as conn:
        for key, data in conn.execute("SELECT key, data FROM nodes").fetchall():
            if not data.startswith(b"BFSC"):
                continue  # a level (JSON)
            chunk = Chunk.from_bytes(data)
            if len(chunk.art_paths) > 8:
                garbled = bytearray(chunk.art_paths)
                garbled[4] ^= 0xFF  # inside the first block's deflate stream
                blob = dataclasses.replace(chunk, art_paths=bytes(garbled)).to_bytes()
                conn.execute("UPDATE nodes SET data = ? WHERE key = ?", (blob, key))
                damaged += 1
    assert damaged
    with caplog.at_level(logging.WARNING, logger="butlerfs.source"):
        again, counters = _listing(demo.root, [DEFAULTS], index)
    assert again == expected and counters["loads_registry"] >= damaged
    assert "Discarding a damaged listing" in caplog.text


def test_an_index_of_an_older_format_is_emptied_not_read(demo, tmp_path, caplog):
    index = tmp_path / "index"
    expected, _ = _listing(demo.root, [DEFAULTS], index)
    (db,) = index.glob("*.sqlite")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM nodes").fetchone()[0] > 0
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'version'")  # chunks of format 1
        conn.execute("UPDATE nodes SET data = X'42465343010000000000'")  # which format 2 cannot read
    with caplog.at_level(logging.WARNING, logger="butlerfs"):
        again, counters = _listing(demo.root, [DEFAULTS], index)
    assert again == expected and counters["loads_registry"] >= 1 and not counters.get("loads_index")
    assert "Discarding" not in caplog.text


@pytest.fixture
def scratch(demo, tmp_path):
    """A dataset type and collections of our own in the demo repository, removed afterwards."""
    from lsst.daf.butler import Butler, CollectionType, DatasetType

    from butlerfs.formatter import put_source_extension

    butler = Butler.from_config(demo.root, writeable=True)
    plain = DatasetType("scaleTest", ["instrument", "detector"], "ButlerfsFile", universe=butler.dimensions)
    dims = ["instrument", "detector"]
    calib = DatasetType("scaleCalib", dims, "ButlerfsFile", universe=butler.dimensions, isCalibration=True)
    for dataset_type in (plain, calib):
        butler.registry.registerDatasetType(dataset_type)
    runs: list[str] = []
    others: list[str] = []

    def run(name: str) -> str:
        butler.collections.register(name)
        runs.append(name)
        return name

    def other(name: str, kind: CollectionType) -> str:
        butler.collections.register(name, kind)
        others.append(name)
        return name

    def put(dataset_type, run_name: str, detector: int, text: str):
        payload = tmp_path / f"{len(text)}-{detector}.txt"
        payload.write_text(text)
        with put_source_extension(payload) as uri:
            return butler.put(uri, dataset_type, instrument=INSTRUMENT, detector=detector, run=run_name)

    yield SimpleNamespace(butler=butler, plain=plain, calib=calib, run=run, other=other, put=put,
                          index=tmp_path / "index")
    for name in reversed(others):  # a chain before the collections it holds
        butler.registry.removeCollection(name)
    butler.removeRuns(runs)
    for dataset_type in (plain, calib):
        butler.registry.removeDatasetType(dataset_type.name)


def test_new_and_removed_datasets_invalidate_the_index(demo, scratch):
    run = scratch.run("u/scale/run")
    scratch.put(scratch.plain, run, 1, "one")
    first, _ = _listing(demo.root, [run], scratch.index, dataset_types=["scaleTest"])
    assert len(first) == 1
    ref = scratch.put(scratch.plain, run, 2, "two")
    again, counters = _listing(demo.root, [run], scratch.index, dataset_types=["scaleTest"])
    assert len(again) == 2 and counters["loads_registry"] >= 1
    # One removed and one added: the count is the same, the ingest dates are not.
    scratch.butler.pruneDatasets([ref], purge=True, unstore=True)
    scratch.put(scratch.plain, run, 0, "zero")
    third, _ = _listing(demo.root, [run], scratch.index, dataset_types=["scaleTest"])
    assert sorted(p.rsplit("_", 1)[-1] for p in third) == ["0.txt", "1.txt"]


def _assert_ingest_dates_are_the_butlers(demo, tags: bool = True) -> None:
    """The dates a listing reads as stored equal the Butler's own, converted by astropy.

    Read with the datasets from the tags table, or (``tags=False``, as when a ``where``
    constrains the mount) with the datastore records.
    """
    from lsst.daf.butler import Butler

    index = RepoIndex(demo.root, [DEFAULTS])
    if not tags:
        index._tags = None
    try:
        butler = Butler.from_config(demo.root)
        try:
            assert index.datastore.reads_ingest_dates
            for dataset_type in demo.dataset_counts:
                rows = index.rows(dataset_type, {}, ingest_dates=True)
                assert rows is not None and rows.ingest_dates is not None and len(rows) > 0
                with butler.query() as query:
                    found = query.join_dataset_search(dataset_type, [DEFAULTS]).general(
                        butler.get_dataset_type(dataset_type).dimensions,
                        dataset_fields={dataset_type: {"dataset_id", "ingest_date"}},
                        find_first=True,
                    )
                    id_key, date_key = f"{dataset_type}.dataset_id", f"{dataset_type}.ingest_date"
                    expected = {row[id_key]: row[date_key].utc.unix for row in found}
                listed = dict(zip(rows.ids, rows.ingest_dates, strict=True))
                assert listed.keys() == expected.keys()
                assert max(abs(listed[i] - expected[i]) for i in listed) < 1e-3
        finally:
            butler.close()
    finally:
        index.close()


@pytest.mark.parametrize("tags", [True, False], ids=["with-the-datasets", "with-the-records"])
def test_ingest_dates_read_as_stored_are_the_butlers(any_demo, tags):
    # A direct Butler's listing reads ingest dates as stored; they must be the dates the
    # Butler's own query returns (as astropy Time, converted by astropy).
    _assert_ingest_dates_are_the_butlers(any_demo, tags)


def test_ingest_dates_of_a_schema_1_registry_are_the_butlers(tmp_path, monkeypatch):
    # Registries whose datasets manager predates schema 2.0 store ingest_date as a TIMESTAMP
    # (UTC, naive), not as nanoseconds TAI: read as stored, it is a datetime.
    import butlerfs.demo
    from butlerfs.demo import make_demo_repo
    from butlerfs.formatter import storage_class_config

    def schema_1_config() -> dict:
        config = storage_class_config()
        manager = "lsst.daf.butler.registry.datasets.byDimensions.ByDimensionsDatasetRecordStorageManagerUUID"
        config["registry"] = {"managers": {"datasets": {"cls": manager, "schema_version": "1.0.0"}}}
        return config

    monkeypatch.setattr(butlerfs.demo, "storage_class_config", schema_1_config)
    demo = make_demo_repo(str(tmp_path / "repo"), visits=1, detectors=1, image_size=16)
    connection = sqlite3.connect(tmp_path / "repo" / "gen3.sqlite3")
    try:
        query = "SELECT type FROM pragma_table_info('dataset') WHERE name = 'ingest_date'"
        assert connection.execute(query).fetchone() == ("TIMESTAMP",)
    finally:
        connection.close()
    _assert_ingest_dates_are_the_butlers(demo, tags=True)
    _assert_ingest_dates_are_the_butlers(demo, tags=False)


@pytest.mark.parametrize("joined", [True, False], ids=["joined-query", "export-rows"])
def test_a_dataset_trashed_but_not_emptied_is_not_listed(demo, scratch, monkeypatch, joined):
    # Pruning with unstore=True and purge=False stopped half-way leaves the datastore's
    # records of a dataset whose location is in the trash; its file may be gone already.
    if not joined:
        monkeypatch.setattr("butlerfs.datastore_direct._records_query", lambda store, dataset_table: None)
    run = scratch.run("u/scale/trash")
    scratch.put(scratch.plain, run, 1, "kept")
    gone = scratch.put(scratch.plain, run, 2, "trashed")
    scratch.butler._datastore.trash([gone])
    listing, _ = _listing(demo.root, [run], None, dataset_types=["scaleTest"])
    assert [p.rsplit("_", 1)[-1] for p in listing] == ["1.txt"]
    scratch.butler._datastore.emptyTrash()


def test_redefined_chain_invalidates_the_index(demo, scratch):
    from lsst.daf.butler import CollectionType

    old, new = scratch.run("u/scale/old"), scratch.run("u/scale/new")
    scratch.put(scratch.plain, old, 1, "old")
    scratch.put(scratch.plain, new, 1, "newer")
    chain = scratch.other("u/scale/chain", CollectionType.CHAINED)
    scratch.butler.collections.redefine_chain(chain, [old])
    first, _ = _listing(demo.root, [chain], scratch.index, dataset_types=["scaleTest"])
    assert [v[1] for v in first.values()] == [old]
    scratch.butler.collections.redefine_chain(chain, [new, old])
    again, _ = _listing(demo.root, [chain], scratch.index, dataset_types=["scaleTest"])
    assert [v[1] for v in again.values()] == [new]


def test_certify_and_decertify_invalidate_the_index(demo, scratch):
    from lsst.daf.butler import CollectionType, Timespan

    run = scratch.run("u/scale/calibs")
    a = scratch.put(scratch.calib, run, 1, "a")
    b = scratch.put(scratch.calib, run, 2, "b")
    calibs = scratch.other("u/scale/calib", CollectionType.CALIBRATION)
    forever = Timespan(None, None)
    scratch.butler.registry.certify(calibs, [a], forever)
    first, _ = _listing(demo.root, [calibs], scratch.index, dataset_types=["scaleCalib"])
    assert [v[0] for v in first.values()] == [a.id]
    # As many certified as before, but another dataset: no count or ingest date tells them apart.
    scratch.butler.registry.certify(calibs, [b], forever)
    scratch.butler.registry.decertify(calibs, "scaleCalib", forever, dataIds=[a.dataId])
    again, _ = _listing(demo.root, [calibs], scratch.index, dataset_types=["scaleCalib"])
    assert [v[0] for v in again.values()] == [b.id]


def test_first_lookup_in_a_large_run_loads_its_own_value_only(demo, tmp_path, monkeypatch):
    """An `ls` of one directory waits for its datasets, not its siblings'; a walk still sees all once."""
    monkeypatch.setattr("butlerfs.source.ISOLATE_ABOVE", 0)
    expected, _ = _listing(demo.root, [DEFAULTS], None)
    index = tmp_path / "index"
    # With 5 datasets per query, the detectors come in runs of two (a calexp per visit each).
    source = _source(demo.root, [DEFAULTS], index, subtree_limit=5, dataset_types=["calexp"])
    wanted = demo.detectors[1]
    try:
        source.scandir(f"/calexp/instrument_{INSTRUMENT}")  # lists the detectors, looks none up
        level = source.lookup(f"/calexp/instrument_{INSTRUMENT}").level
        assert level is not None and level.values is not None
        run = level.slot_of(level.values.index(wanted))
        assert run.group is not None and len(run.group[1]) == 2
        node = source.lookup(f"/calexp/instrument_{INSTRUMENT}/detector_{wanted}")
        assert isinstance(node, Directory) and node.chunk is not None
        assert node.chunk.fixed == (("instrument", INSTRUMENT), ("detector", wanted)), "its own piece"
        assert run.node is None and node.slot is level.peeks[wanted], "the run is not loaded"
        assert {name for name, _ in source.listdir(
            f"/calexp/instrument_{INSTRUMENT}/detector_{wanted}")} == {f"visit_{v}" for v in demo.visits}
        loads = source.memory()["loads_registry"]
        files = {p: (f.dataset.id, f.dataset.run, f.size) for p, f in _walk(source).items()}
        assert files == {p: v for p, v in expected.items() if p.startswith("/calexp/")}
        # Each run of the walk is one query; the run that held the looked-up value, one more.
        runs = -(-len(demo.detectors) // 2)
        assert source.memory()["loads_registry"] - loads == runs
    finally:
        source.close()
    # The index holds the runs whole: a remount walks without a listing query.
    again, counters = _listing(demo.root, [DEFAULTS], index, subtree_limit=5, dataset_types=["calexp"])
    assert again == files and not counters.get("loads_registry")


def test_a_types_instruments_are_those_its_collections_hold(tmp_path):
    """The first dimension (a governor) is probed value by value: only the searched collections count."""
    from lsst.daf.butler import Butler, DatasetType

    from butlerfs.formatter import put_source_extension

    root = tmp_path / "repo"
    Butler.makeRepo(str(root))
    butler = Butler.from_config(str(root), writeable=True)
    names = ["CamA", "CamB", "CamC"]
    for name in names:
        butler.registry.insertDimensionData(
            "instrument", dict(name=name, visit_max=10, exposure_max=10, detector_max=4, class_name="x.Y")
        )
        butler.registry.insertDimensionData("detector", *[dict(instrument=name, id=d) for d in range(2)])
    butler.registry.registerDatasetType(
        DatasetType("sky", ["instrument", "detector"], "ButlerfsFile", universe=butler.dimensions)
    )
    for name in names[:2]:  # CamC has no dataset anywhere; CamB only in its own run
        butler.collections.register(f"run/{name}")
        for detector in range(2):
            payload = tmp_path / f"{name}-{detector}.txt"
            payload.write_text(f"{name} {detector}")
            with put_source_extension(payload) as uri:
                butler.put(uri, "sky", instrument=name, detector=detector, run=f"run/{name}")
    butler.close()

    def top(collections: list[str], where: str = "") -> list[str]:
        source = ButlerSource(RepoIndex(str(root), collections, where=where), subtree_limit=1)
        try:
            return [name for name, _ in source.listdir("/sky")]
        finally:
            source.close()

    assert top(["run/CamA"]) == ["instrument_CamA"]
    assert top(["run/CamB", "run/CamA"]) == ["instrument_CamA", "instrument_CamB"]
    assert top(["run/CamA", "run/CamB"], where="detector = 1 AND instrument = 'CamB'") == ["instrument_CamB"]
    index = RepoIndex(str(root), ["run/CamA", "run/CamB"])
    try:
        assert index.dataset_types["sky"].governors == {"instrument"}
        assert index.distinct("sky", {}, "instrument") == ["CamA", "CamB"]
        assert index.distinct("sky", {"instrument": "CamB"}, "detector") == [0, 1]
    finally:
        index.close()


def test_a_path_looked_up_directly_lists_no_level_on_its_way(demo, monkeypatch):
    """A program opening a path by its data ID waits for that data ID's datasets only."""
    expected, _ = _listing(demo.root, [DEFAULTS], None, dataset_types=["calexp"])
    source = _source(demo.root, [DEFAULTS], None, subtree_limit=1, dataset_types=["calexp"])
    instrument = f"/calexp/instrument_{INSTRUMENT}"
    try:
        for path, (dataset_id, _, _) in list(expected.items())[:2]:
            node = source.lookup(path)
            assert isinstance(node, File) and node.dataset.id == dataset_id
        level = source.lookup(instrument).level
        assert level is not None and level.values is None, "the detectors were not listed"
        assert not source.memory().get("levels_listed")
        with pytest.raises(FsError) as missing:
            source.lookup(f"{instrument}/detector_999/visit_1")
        assert missing.value.errno == errno.ENOENT
        with pytest.raises(FsError) as hostile:  # no query: SQLite cannot compare it
            source.lookup(f"{instrument}/detector_{10**30}/visit_1")
        assert hostile.value.errno == errno.ENOENT
        detectors = sorted(f"detector_{d}" for d in demo.detectors)
        assert [name for name, _ in source.listdir(instrument)] == detectors
        assert source.memory()["levels_listed"] >= 1
        files = {p: (f.dataset.id, f.dataset.run, f.size) for p, f in _walk(source).items()}
        assert files == expected
    finally:
        source.close()
    # Looked up one by one past a few values, a level is listed: its runs then load whole.
    monkeypatch.setattr("butlerfs.source.PEEKS_BEFORE_LISTING", 2)
    source = _source(demo.root, [DEFAULTS], None, subtree_limit=1, dataset_types=["calexp"])
    try:
        for detector in demo.detectors:
            assert isinstance(source.lookup(f"{instrument}/detector_{detector}"), Directory)
        level = source.lookup(instrument).level
        assert level is not None and list(level.values) == sorted(demo.detectors)
    finally:
        source.close()
