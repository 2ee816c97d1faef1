"""Listing queries read from a direct Butler's tags tables give the Butler's own answers."""

from __future__ import annotations

import pytest
from conftest import DEFAULTS
from test_index import INSTRUMENT, scratch  # noqa: F401 (a fixture)

from butlerfs import registry_direct
from butlerfs.registry import RepoIndex


class _Spy:
    """Counts the tags table's answers that were not left to the Butler."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.answered: dict[str, int] = {"distinct": 0, "rows": 0, "count": 0}
        for name in self.answered:
            original = getattr(registry_direct.TagsTable, name)

            def spied(self_, *args, _original=original, _name=name, **kwargs):
                found = _original(self_, *args, **kwargs)
                self.answered[_name] += found is not None
                return found

            monkeypatch.setattr(registry_direct.TagsTable, name, spied)


def _pair(repo: str, collections: list[str], **kwargs) -> tuple[RepoIndex, RepoIndex]:
    """The same query twice: from the tags tables, and through the Butler's query system."""
    direct, butler = RepoIndex(repo, collections, **kwargs), RepoIndex(repo, collections, **kwargs)
    assert direct._tags is not None
    butler._tags = None
    return direct, butler


def _rows(index: RepoIndex, dataset_type: str, fixed: dict, group=None, **kwargs):
    """`RepoIndex.rows` as a set of comparable tuples (`None` stays `None`)."""
    rows = index.rows(dataset_type, fixed, group, **kwargs)
    if rows is None:
        return None
    artifacts = [tuple((s, a.path, a.size, a.component, a.checksum) for s, a in x) for x in rows.artifacts]
    dates = [None if d is None else round(d, 3) for d in rows.ingest_dates or [None] * len(rows)]
    return set(zip(rows.ids, rows.runs, dates, *rows.values, artifacts, strict=True))


def _compare(direct: RepoIndex, butler: RepoIndex, dataset_type: str) -> int:
    """Compare every level's values and a few pieces' rows; return how many datasets were compared."""
    dims = direct.dataset_types[dataset_type].dimensions
    compared = 0
    prefixes: list[dict] = [{}]
    for depth, dim in enumerate(dims):
        following: list[dict] = []
        for fixed in prefixes:
            values = direct.distinct(dataset_type, fixed, dim)
            assert values == butler.distinct(dataset_type, fixed, dim), (fixed, dim)
            # Also the values of a dimension further down, not next in the index.
            for later in dims[depth + 1 :]:
                mine = direct.distinct(dataset_type, fixed, later)
                assert mine == butler.distinct(dataset_type, fixed, later)
            for group in (values[: len(values) // 2 + 1], values[len(values) // 2 :]):
                if group:
                    for dated in (True, False):
                        mine = _rows(direct, dataset_type, fixed, (dim, group), ingest_dates=dated)
                        assert mine == _rows(butler, dataset_type, fixed, (dim, group), ingest_dates=dated)
                        compared += len(mine)
            following += [{**fixed, dim: v} for v in values[:2]]
        prefixes = following
    whole = _rows(direct, dataset_type, {}, ingest_dates=True)
    assert whole == _rows(butler, dataset_type, {}, ingest_dates=True) and whole
    for limit in (len(whole) - 1, len(whole)):
        mine = _rows(direct, dataset_type, {}, max_rows=limit)
        assert mine == _rows(butler, dataset_type, {}, max_rows=limit)
    return compared + len(whole)


@pytest.mark.parametrize("walk_limit", [registry_direct.WALK_LIMIT, 1], ids=["walked", "scanned"])
def test_tags_answers_are_the_butlers(any_demo, monkeypatch, walk_limit):
    # Walked: every level's few values found one index probe each. Scanned: the walk
    # gives up at once and one DISTINCT reads them.
    monkeypatch.setattr(registry_direct, "WALK_LIMIT", walk_limit)
    spy = _Spy(monkeypatch)
    direct, butler = _pair(any_demo.root, [DEFAULTS])
    try:
        compared = sum(_compare(direct, butler, name) for name in direct.dataset_types)
        assert compared > 2 * sum(any_demo.dataset_counts.values())
        for name in direct.dataset_types:
            assert direct.state(name, since=0.0) == butler.state(name, since=0.0)
    finally:
        direct.close()
        butler.close()
    assert all(spy.answered.values()), spy.answered


def test_calibration_types_searched_in_their_run(any_demo, monkeypatch):
    # No CALIBRATION collection searched: bias and flat come from the tags table, flat's
    # physical_filter a string dimension (walked, narrowed by a group of strings), the RUN
    # searched twice around a chain that does not hold them.
    collections = any_demo.collections
    run = next(name for name, kind in collections.items() if kind == "RUN" and "/calib/" in name)
    chain = next(name for name, kind in collections.items() if kind == "CHAINED" and name != DEFAULTS)
    spy = _Spy(monkeypatch)
    direct, butler = _pair(any_demo.root, [run, chain, run], dataset_types=["bias", "flat"])
    try:
        compared = sum(_compare(direct, butler, name) for name in ("bias", "flat"))
        assert compared > any_demo.dataset_counts["bias"] + any_demo.dataset_counts["flat"]
    finally:
        direct.close()
        butler.close()
    assert spy.answered["rows"] and spy.answered["distinct"], spy.answered


def test_find_first_through_a_chain_with_a_tagged_collection(demo, scratch, monkeypatch):  # noqa: F811
    from lsst.daf.butler import CollectionType

    old, new = scratch.run("u/tags/old"), scratch.run("u/tags/new")
    older = [scratch.put(scratch.plain, old, d, f"old {d}") for d in range(3)]
    scratch.put(scratch.plain, new, 1, "new 1")
    scratch.put(scratch.plain, new, 2, "new 2")
    tagged = scratch.other("u/tags/tagged", CollectionType.TAGGED)
    scratch.butler.registry.associate(tagged, [older[2]])
    chain = scratch.other("u/tags/chain", CollectionType.CHAINED)
    # Detector 2: the tagged dataset (of run old) before new's; 1: new's; 0: old's.
    scratch.butler.collections.redefine_chain(chain, [tagged, new, old])
    spy = _Spy(monkeypatch)
    for collections in ([chain], [new, chain], [old, tagged], [tagged]):
        direct, butler = _pair(demo.root, collections, dataset_types=["scaleTest"])
        try:
            mine = _rows(direct, "scaleTest", {}, ingest_dates=True)
            assert mine == _rows(butler, "scaleTest", {}, ingest_dates=True)
            for fixed, dim in [({}, "instrument"), ({"instrument": INSTRUMENT}, "detector")]:
                assert direct.distinct("scaleTest", fixed, dim) == butler.distinct("scaleTest", fixed, dim)
        finally:
            direct.close()
            butler.close()
        if collections == [chain]:
            runs = {row[4]: row[1] for row in mine}  # detector: run
            assert runs == {0: old, 1: new, 2: old}
    assert spy.answered["rows"] == 4 and spy.answered["distinct"] == 8


def test_certified_calibrations_and_where_are_left_to_the_butler(demo, scratch, monkeypatch):  # noqa: F811
    from lsst.daf.butler import CollectionType, Timespan

    run = scratch.run("u/tags/calibs")
    certified = scratch.put(scratch.calib, run, 1, "a")
    scratch.put(scratch.plain, run, 1, "plain 1")
    scratch.put(scratch.plain, run, 2, "plain 2")
    calibs = scratch.other("u/tags/calib", CollectionType.CALIBRATION)
    scratch.butler.registry.certify(calibs, [certified], Timespan(None, None))
    spy = _Spy(monkeypatch)
    index = RepoIndex(demo.root, [calibs, run])
    try:
        # The search path holds a CALIBRATION collection: its datasets are not in the tags table.
        assert index._tags.distinct("scaleCalib", [calibs, run], {}, "instrument") is None
        rows = index.rows("scaleCalib", {}, ingest_dates=True)
        assert rows is not None and rows.ids == [certified.id]
        # Another type's datasets cannot be certified: the CALIBRATION collection is skipped.
        assert index.distinct("scaleTest", {"instrument": INSTRUMENT}, "detector") == [1, 2]
    finally:
        index.close()
    assert spy.answered == {"distinct": 1, "rows": 0, "count": 0}
    spy.answered["distinct"] = 0
    index = RepoIndex(demo.root, [run], where=f"instrument = '{INSTRUMENT}' AND detector = 1")
    try:
        assert index.distinct("scaleTest", {"instrument": INSTRUMENT}, "detector") == [1]
        assert len(index.rows("scaleTest", {})) == 1
    finally:
        index.close()
    assert not any(spy.answered.values())


def test_a_chain_of_runs_reads_only_what_it_finds(demo, scratch, monkeypatch):  # noqa: F811
    from lsst.daf.butler import CollectionType

    runs = [scratch.run(f"u/tags/many{i}") for i in range(3)]
    for detector, run in enumerate(runs):
        scratch.put(scratch.plain, run, detector, f"many {detector}")
    aside = scratch.run("u/tags/aside")  # not searched: its dataset is found through a TAGGED collection
    tagged = scratch.other("u/tags/picked", CollectionType.TAGGED)
    scratch.butler.registry.associate(tagged, [scratch.put(scratch.plain, aside, 0, "aside 0")])
    chain = scratch.other("u/tags/many", CollectionType.CHAINED)
    scratch.butler.collections.redefine_chain(chain, [tagged, *runs])
    direct, butler = _pair(demo.root, [chain], dataset_types=["scaleTest"])
    manager = direct._tags._collections
    looked_up: list[str] = []
    original = type(manager).__getitem__

    def getitem(self, key):
        record = original(self, key)
        if self is manager:
            looked_up.append(record.name)
        return record

    monkeypatch.setattr(type(manager), "__getitem__", getitem)
    try:
        mine = _rows(direct, "scaleTest", {}, ingest_dates=True)
        assert mine == _rows(butler, "scaleTest", {}, ingest_dates=True)
        named = list(looked_up)
        # The records are read for the datasets found: not for many0's, passed over.
        found, selection = direct._tags.rows(
            "scaleTest", [chain], ["instrument", "detector"], {}, None, dates=False, max_rows=None
        )
        with direct._butler._registry._db.query(selection) as result:
            assert set(result.scalars()) == {row[0] for row in found} == {row[0] for row in mine}
    finally:
        direct.close()
        butler.close()
    assert sorted(row[1] for row in mine) == sorted([aside, *runs[1:]])
    # A chain of many runs cost one collection query per run holding a dataset of the piece.
    assert named == [aside]
