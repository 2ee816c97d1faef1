"""Columnar listings without a Butler: sorting, directories, names, the on-disk form."""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

import numpy as np
import pytest

from butlerfs.layout import dataset_path
from butlerfs.listing import Chunk, DatasetRows, candidate_values

DIMS = ("instrument", "detector", "physical_filter")


@dataclass
class Art:
    path: str
    size: int
    component: str | None = None
    checksum: str | None = None


def _rows(
    data_ids: list[tuple[str, int, str]], *, components: tuple[str | None, ...] = (None,)
) -> DatasetRows:
    ids = [uuid.uuid4() for _ in data_ids]
    arts = [
        [(0, Art(f"flat/{i}/{c or 'whole'}.fits", 100 + i, c, "sha" if i == 0 else None)) for c in components]
        for i in range(len(data_ids))
    ]
    values = [[d[k] for d in data_ids] for k in range(3)]
    return DatasetRows(DIMS, values, ids, ["run/a"] * len(ids), None, arts)


DATA_IDS = [
    ("LATISS", 3, "SDSSr_65mm~empty"),
    ("LATISS", 0, "u_sim_1.4"),
    ("LATISS", 0, "g"),
    ("HSC", 12, "HSC-R2"),
    ("LATISS", 0, "g"),  # a second dataset with the same data ID (a calibration)
]


def _names(chunk: Chunk, *, flat: bool = False) -> dict[str, int]:
    """Every file path of a chunk, walking it as the source does."""
    found: dict[str, int] = {}

    def walk(prefix: str, column: int, lo: int, hi: int) -> None:
        last = len(DIMS) - (1 if flat else 0)
        if column == last:
            for name, art, _ in chunk.files(lo, hi):
                assert name not in found
                found[f"{prefix}/{name}"] = art
                assert chunk.find_file(lo, hi, name) is not None
            return
        for name, start, stop in chunk.subdirectories(column, lo, hi):
            walk(f"{prefix}/{name}", column + 1, start, stop)

    walk("flat", 0, 0, len(chunk))
    return found


@pytest.mark.parametrize("flat", [False, True])
def test_every_dataset_gets_its_layout_path(flat):
    chunk = Chunk.build("flat", (), _rows(DATA_IDS), listed_at=1.0)
    paths = _names(chunk, flat=flat)
    unique = [d for d in DATA_IDS if DATA_IDS.count(d) == 1]
    for d in unique:
        assert dataset_path("flat", list(zip(DIMS, d, strict=True)), ".fits", flat=flat) in paths
    # The two datasets sharing a data ID are told apart by a UUID prefix.
    shared = dataset_path("flat", list(zip(DIMS, DATA_IDS[2], strict=True)), ".fits", flat=flat)
    stem = shared.removesuffix(".fits")
    twins = [p for p in paths if p.startswith(stem + "-")]
    assert len(twins) == 2 and all(len(p) == len(shared) + 9 for p in twins)
    assert len(paths) == len(DATA_IDS)
    assert all(p.endswith(".fits") for p in paths)


def test_components_and_rows_of_a_directory():
    rows = _rows(DATA_IDS[:3], components=("image", "mask"))
    chunk = Chunk.build("calexp", (("instrument", "LATISS"),), rows, listed_at=1.0)
    # Columns start below the fixed instrument.
    assert [name for name, _, _ in chunk.subdirectories(0, 0, len(chunk))] == ["detector_0", "detector_3"]
    lo, hi = chunk.rows_with(0, 0, len(chunk), 0)
    assert hi - lo == 2
    names = [name for name, _, _ in chunk.files(lo, hi)]
    assert len(names) == 4 and all(n.startswith(("calexp.image_", "calexp.mask_")) for n in names)
    start, stop = chunk.rows_with(0, 0, len(chunk), 7)
    assert start == stop


def test_on_disk_form_round_trips_and_refuses_garbage():
    chunk = Chunk.build("flat", (), _rows(DATA_IDS), listed_at=12.5)
    back = Chunk.from_bytes(chunk.to_bytes())
    assert _names(back) == _names(chunk)
    assert back.checksums == chunk.checksums and back.listed_at == 12.5
    for row in range(len(chunk)):
        assert back.dataset_id(row) == chunk.dataset_id(row)
        assert back.data_id(row) == chunk.data_id(row)
    blob = chunk.to_bytes()
    for bad in (b"", b"BFSC", blob[:20], blob[:8] + b"\0" * 30, b"XXXX" + blob[4:]):
        with pytest.raises(ValueError):
            Chunk.from_bytes(bad)


def test_nbytes_is_about_a_hundred_bytes_per_dataset():
    data_ids = [("LSSTCam", d, f"v{v}") for d in range(10) for v in range(100)]
    chunk = Chunk.build("calexp", (), _rows(data_ids), listed_at=1.0)
    assert chunk.nbytes / len(chunk) < 200


def _long_paths(n: int) -> DatasetRows:
    """``n`` datasets whose paths look like a processing run's (about 145 bytes each)."""
    run = "HSC/runs/RC2/w_2023_07/DM-38042/20230221T012345Z"
    ids = [uuid.uuid4() for _ in range(n)]
    visits = [1228 + i // 100 for i in range(n)]
    detectors = [i % 100 for i in range(n)]
    arts = [
        [(0, Art(f"{run}/calexp/HSC-I/{v}/calexp_HSC_HSC-I_{v}_{d}_{run.replace('/', '_')}.fits", 10 + i))]
        for i, (v, d) in enumerate(zip(visits, detectors, strict=True))
    ]
    values = [["HSC"] * n, visits, detectors]
    return DatasetRows(("instrument", "visit", "detector"), values, ids, [run] * n, None, arts)


def test_paths_are_held_compressed_and_read_back_exactly():
    rows = _long_paths(1000)  # 16 blocks of paths, the last one partial
    chunk = Chunk.build("calexp", (("instrument", "HSC"),), rows, listed_at=1.0)
    back = Chunk.from_bytes(chunk.to_bytes())
    raw = sum(len(a.path) for arts in rows.artifacts for _, a in arts)
    assert raw / len(chunk) > 140
    # Everything but the paths is about 70 bytes a dataset; the paths share most of their text.
    assert chunk.nbytes / len(chunk) < 100
    by_id = {dataset_id: arts[0][1] for dataset_id, arts in zip(rows.ids, rows.artifacts, strict=True)}
    for got in (chunk, back):
        for row in range(len(got)):
            art = int(got.art_start[row])
            store, path, size, _, _ = got.artifact(art)
            want = by_id[got.dataset_id(row)]
            assert (store, path, size) == (0, want.path, want.size)


def test_damaged_path_blocks_are_refused():
    chunk = Chunk.build("calexp", (("instrument", "HSC"),), _long_paths(200), listed_at=1.0)
    for blocks in (chunk.art_path_blocks[:-1], chunk.art_path_blocks[::-1].copy(), chunk.art_path_blocks + 1):
        bad = dataclasses.replace(chunk, art_path_blocks=blocks)
        with pytest.raises(ValueError):
            Chunk.from_bytes(bad.to_bytes())


def test_paths_read_back_across_blocks_with_several_or_no_artifacts_per_dataset():
    # 0, 1, 2 or 3 artifacts a dataset: artifact numbers and block boundaries no longer line up
    # with rows, and 64-artifact blocks end in the middle of a dataset.
    n = 150
    ids = [uuid.uuid4() for _ in range(n)]
    arts = [[(0, Art(f"run/t/{i}/c{k}.fits", i * 10 + k, f"c{k}")) for k in range(i % 4)] for i in range(n)]
    rows = DatasetRows(("instrument", "visit"), [["HSC"] * n, list(range(n))], ids, ["run"] * n, None, arts)
    empty = DatasetRows(("visit",), [[]], [], [], None, [])
    no_artifacts = DatasetRows(("visit",), [[1, 2]], ids[:2], ["run"] * 2, None, [[], []])
    for fixed, some in (((("instrument", "HSC"),), rows), ((), empty), ((), no_artifacts)):
        built = Chunk.build("t", fixed, some, listed_at=1.0)
        by_id = {i: [a.path for _, a in arts] for i, arts in zip(some.ids, some.artifacts, strict=True)}
        want = [p for row in range(len(built)) for p in by_id[built.dataset_id(row)]]
        assert len(want) == sum(len(arts) for arts in some.artifacts)
        for chunk in (built, Chunk.from_bytes(built.to_bytes())):
            assert [chunk.path(a) for a in range(len(chunk.art_sizes))] == want


def _damaged(chunk: Chunk, **changes: object) -> bytes:
    return dataclasses.replace(chunk, **changes).to_bytes()  # type: ignore[arg-type]


def test_damaged_but_readable_chunks_are_refused_when_loaded():
    """A blob that decompresses and parses, but whose paths or artifact table are wrong.

    Each must fail to load (`ValueError`: the listing is discarded and fetched again),
    not load and then fail in a lookup (`path`) or a listing (`files`).
    """
    chunk = Chunk.build("calexp", (("instrument", "HSC"),), _long_paths(200), listed_at=1.0)
    garbled = bytearray(chunk.art_paths)
    garbled[chunk.art_path_blocks[1] + 5] ^= 0xFF  # inside the second block's deflate stream
    starts = chunk.art_path_start.copy()
    starts[3] = starts[-1] + 10_000  # a path past the end of its block
    art_start = chunk.art_start.copy()
    art_start[-1] += 1  # the last dataset owns an artifact that does not exist
    truncated = chunk.art_path_blocks.copy()
    truncated[1] -= 3  # the first block cut short, the second starting inside it
    for blob in (
        _damaged(chunk, art_paths=bytes(garbled)),
        _damaged(chunk, art_path_start=starts),
        _damaged(chunk, art_start=art_start),
        _damaged(chunk, art_path_blocks=truncated),
        _damaged(chunk, art_path_start=chunk.art_path_start.astype(np.float64)),
        _damaged(chunk, art_exts=chunk.art_exts + 7),
    ):
        with pytest.raises(ValueError, match="damaged chunk"):
            Chunk.from_bytes(blob)


def test_candidate_values_read_the_last_value_back():
    values = {"u_sim_1.4", "g", "SDSSr_65mm-x7eempty"}
    name = "flat_LATISS_0_u_sim_1.4.fits"
    assert list(candidate_values(name, False, lambda v: v in values)) == ["u_sim_1.4"]
    named = "calexp_LSSTCam_42_733724-0a1b2c3d.fits"
    assert list(candidate_values(named, True, lambda v: v == 733724)) == [733724]
    assert list(candidate_values("calexp_LSSTCam_42.fits", True, lambda v: False)) == []
