"""Compact, columnar listings: the datasets under one partial data ID, held as arrays.

A walk of a million datasets used to build a Python object per dataset, per artifact,
per directory and per name (about 1.9 KB each). A `Chunk` instead holds one numpy
array per column, rows sorted by data ID, so that every directory inside it is a
contiguous range of rows: its subdirectories are where the next dimension's column
changes value, a child is found by binary search, and names are made only when a
directory is listed. About 60 bytes per dataset plus the artifact's path, which is
kept zlib-compressed in blocks of `PATH_BLOCK` paths: consecutive datasets' paths share
most of their text (the run, the dataset type, the data ID's leading values), and a path
is needed only when a file is opened or looked up, not when a directory is listed.

`DatasetRows` is what the registry hands over (plain columns); `Chunk.build` sorts and
packs it; `Chunk.to_bytes` / `Chunk.from_bytes` give the on-disk form kept by
`butlerfs.index` (JSON header + raw arrays, zlib; no pickle, so a damaged or foreign
file can only fail to load). This module knows nothing of the Butler or of FUSE.
"""

from __future__ import annotations

import json
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .layout import DataIdValue, decode_value, dimension_dir, encode_value, file_name

__all__ = ["FORMAT_VERSION", "ArtifactLike", "Chunk", "DatasetRows", "candidate_values", "extension_of_path"]

FORMAT_VERSION = 2
"""Version of `Chunk.to_bytes`; a different version is never read (1: paths uncompressed)."""

PATH_BLOCK = 64
"""Artifact paths compressed together: a path costs one block's decompression (about 10 µs)."""

_MAGIC = b"BFSC"
_HEADER = struct.Struct("<4sII")  # magic, format version, header length


class ArtifactLike(Protocol):
    """What a chunk takes from a datastore record (`butlerfs.registry.Artifact`)."""

    path: str
    size: int
    component: str | None
    checksum: str | None


@dataclass
class DatasetRows:
    """Datasets as the registry returns them, one list per column (unsorted).

    ``artifacts[i]`` are the artifacts of dataset ``i`` as ``(store, artifact)``:
    ``store`` numbers the datastore whose root resolves a relative path (-1 for a path
    that is already an absolute URI).
    """

    dimensions: tuple[str, ...]
    values: list[list[DataIdValue]]
    """One column per dimension, in ``dimensions`` order."""
    ids: list[uuid.UUID]
    runs: list[str]
    ingest_dates: list[float] | None
    artifacts: Sequence[Sequence[tuple[int, ArtifactLike]]]

    def __len__(self) -> int:
        return len(self.ids)


def extension_of_path(path: str) -> str:
    """Return an artifact path's extension (``.fits``, ``.fits.fz``); see `butlerfs.artifacts`."""
    from .artifacts import extension_of

    if "#" in path or "%" in path or ":" in path:
        return extension_of(path)  # a URI, a zip member or an escaped name: parse it fully
    # A plain relative path (nearly all of them): the same rule without URL parsing.
    name = path.rsplit("/", 1)[-1]
    stem, dot, last = name.rpartition(".")
    if not dot or not stem or last.lower() in ("gz", "fz", "bz2", "xz", "zst"):
        return extension_of(path)
    return "." + last


def _starts(parts: Sequence[bytes]) -> np.ndarray:
    """Where each of ``parts`` starts when they are joined end to end, and where the last ends."""
    starts = np.zeros(len(parts) + 1, dtype=np.int64)
    if parts:
        np.cumsum([len(p) for p in parts], out=starts[1:])
    return starts


def _words(offsets: np.ndarray) -> np.ndarray:
    """Non-decreasing offsets as 4-byte words when the last fits (always, short of 2 GiB of paths)."""
    return offsets.astype(np.int32) if offsets[-1] < 1 << 31 else offsets


def _vocabulary(values: Sequence[Any]) -> tuple[list[Any], np.ndarray]:
    """Return the sorted distinct values and each value's index among them."""
    vocab = sorted(set(values))
    index = {v: i for i, v in enumerate(vocab)}
    return vocab, np.fromiter((index[v] for v in values), dtype=np.int32, count=len(values))


@dataclass(eq=False)
class Chunk:
    """Datasets of one dataset type under ``fixed``, sorted by data ID.

    Columns are for the dimensions below ``fixed`` (``dimensions[len(fixed):]``): integer
    dimensions hold their values, string dimensions an index into ``vocab``. Artifacts
    are a second table: dataset ``i`` owns artifacts ``art_start[i]:art_start[i + 1]``.
    """

    dataset_type: str
    dimensions: tuple[str, ...]
    fixed: tuple[tuple[str, DataIdValue], ...]
    columns: list[np.ndarray]
    vocab: list[list[str] | None]
    ids: np.ndarray
    """``(n, 16)`` uint8: each dataset's UUID bytes."""
    run_codes: np.ndarray
    runs: list[str]
    mtimes: np.ndarray | None
    """Each dataset's ingest date, or `None` when the chunk has one ``listed_at`` time."""
    listed_at: float
    duplicate: np.ndarray
    """True where a dataset shares its data ID with another (calibrations): its names get a UUID."""
    art_start: np.ndarray
    art_paths: bytes
    """The paths' blocks, each `PATH_BLOCK` artifacts' paths zlib-compressed, end to end."""
    art_path_blocks: np.ndarray
    """Where each block starts in ``art_paths``, and where the last ends."""
    art_path_start: np.ndarray
    """Where each path starts in the uncompressed text of all the paths, and where the last ends."""
    art_sizes: np.ndarray
    art_stores: np.ndarray
    art_components: np.ndarray
    components: list[str | None]
    art_exts: np.ndarray
    exts: list[str]
    checksums: dict[int, str] = field(default_factory=dict)
    _vocab_index: list[dict[str, int] | None] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self._vocab_index = [None if v is None else {s: i for i, s in enumerate(v)} for v in self.vocab]

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        dataset_type: str,
        fixed: Sequence[tuple[str, DataIdValue]],
        rows: DatasetRows,
        *,
        listed_at: float,
    ) -> Chunk:
        """Sort and pack ``rows``, all of which lie under ``fixed``."""
        depth = len(fixed)
        n = len(rows)
        columns: list[np.ndarray] = []
        vocab: list[list[str] | None] = []
        for values in rows.values[depth:]:
            if all(type(v) is int for v in values):
                columns.append(np.fromiter(values, dtype=np.int64, count=n))
                vocab.append(None)
            else:
                words, codes = _vocabulary([str(v) for v in values])
                columns.append(codes.astype(np.int64))
                vocab.append(words)
        id_bytes = np.frombuffer(b"".join(i.bytes for i in rows.ids), dtype=np.uint8).reshape(n, 16)
        # Sort by data ID, then by UUID so that the order (and calibration names) is stable.
        keys = [id_bytes[:, k] for k in range(15, -1, -1)] + [c for c in reversed(columns)]
        order = np.lexsort(keys) if n else np.zeros(0, dtype=np.int64)
        columns = [c[order] for c in columns]
        id_bytes = id_bytes[order]
        runs, run_codes = _vocabulary(rows.runs)
        mtimes = None
        if rows.ingest_dates is not None:
            mtimes = np.asarray(rows.ingest_dates, dtype=np.float64)[order]
        duplicate = np.zeros(n, dtype=bool)
        if n > 1 and columns:
            same = np.ones(n - 1, dtype=bool)
            for c in columns:
                same &= c[1:] == c[:-1]
            duplicate[1:] |= same
            duplicate[:-1] |= same
        elif n > 1:
            duplicate[:] = True

        art_start = np.zeros(n + 1, dtype=np.int64)
        paths: list[bytes] = []
        sizes: list[int] = []
        stores: list[int] = []
        comps: list[str | None] = []
        ext_of: list[str] = []
        checksums: dict[int, str] = {}
        for i, row in enumerate(order.tolist()):
            for store, art in rows.artifacts[row]:
                if art.checksum:
                    checksums[len(paths)] = art.checksum
                paths.append(art.path.encode())
                sizes.append(art.size)
                stores.append(store)
                comps.append(art.component)
                ext_of.append(extension_of_path(art.path))
            art_start[i + 1] = len(paths)
        path_start = _starts(paths)
        blocks = [
            zlib.compress(b"".join(paths[k : k + PATH_BLOCK])) for k in range(0, len(paths), PATH_BLOCK)
        ]
        block_start = _starts(blocks)
        comp_vocab = sorted({c for c in comps if c is not None})
        comp_index = {c: i + 1 for i, c in enumerate(comp_vocab)}
        ext_vocab, ext_codes = _vocabulary(ext_of)
        return cls(
            dataset_type=dataset_type,
            dimensions=tuple(rows.dimensions),
            fixed=tuple(fixed),
            columns=columns,
            vocab=vocab,
            ids=np.ascontiguousarray(id_bytes),
            run_codes=run_codes[order].astype(np.int16 if len(runs) < 1 << 15 else np.int32),
            runs=runs,
            mtimes=mtimes,
            listed_at=listed_at,
            duplicate=duplicate,
            art_start=_words(art_start),
            art_paths=b"".join(blocks),
            art_path_blocks=block_start,
            art_path_start=_words(path_start),
            art_sizes=np.asarray(sizes, dtype=np.int64),
            art_stores=np.asarray(stores, dtype=np.int16),
            art_components=np.asarray([comp_index.get(c, 0) if c else 0 for c in comps], dtype=np.int16),
            components=[None, *comp_vocab],
            art_exts=ext_codes.astype(np.int16),
            exts=ext_vocab,
            checksums=checksums,
        )

    # -- size ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        """Bytes this chunk holds (arrays, paths, vocabularies; an estimate for the small parts)."""
        arrays = [*self.columns, self.ids, self.run_codes, self.duplicate, self.art_start]
        arrays += [self.art_path_start, self.art_path_blocks, self.art_sizes, self.art_stores]
        arrays += [self.art_components, self.art_exts]
        if self.mtimes is not None:
            arrays.append(self.mtimes)
        small = sum(len(w) + 60 for v in self.vocab if v for w in v) + 100 * len(self.checksums)
        return sum(a.nbytes for a in arrays) + len(self.art_paths) + small + 2000

    # -- reading ------------------------------------------------------------------------------

    def value(self, column: int, row: int) -> DataIdValue:
        """The value of column ``column`` (dimension ``len(fixed) + column``) in ``row``."""
        code = int(self.columns[column][row])
        words = self.vocab[column]
        return code if words is None else words[code]

    def data_id(self, row: int) -> tuple[tuple[str, DataIdValue], ...]:
        """The full data ID of dataset ``row``."""
        depth = len(self.fixed)
        return self.fixed + tuple((dim, self.value(k, row)) for k, dim in enumerate(self.dimensions[depth:]))

    def code_of(self, column: int, value: DataIdValue) -> int | None:
        """The stored code of ``value`` in a column, or `None` if no row has it."""
        index = self._vocab_index[column]
        if index is None:
            return value if type(value) is int else None
        return index.get(str(value))

    def rows_with(self, column: int, lo: int, hi: int, value: DataIdValue) -> tuple[int, int]:
        """The rows within ``lo:hi`` whose column holds ``value`` (empty if none)."""
        code = self.code_of(column, value)
        if code is None:
            return lo, lo
        col = self.columns[column]
        start = lo + int(np.searchsorted(col[lo:hi], code, side="left"))
        stop = lo + int(np.searchsorted(col[lo:hi], code, side="right"))
        return start, stop

    def groups(self, column: int, lo: int, hi: int) -> Iterator[tuple[DataIdValue, int, int]]:
        """The distinct values of a column within ``lo:hi``, each with its rows."""
        if hi <= lo:
            return
        col = self.columns[column][lo:hi]
        starts = (np.flatnonzero(col[1:] != col[:-1]) + 1).tolist()
        bounds = [0, *starts, hi - lo]
        words = self.vocab[column]
        codes = col[[0, *starts]].tolist()
        for k, code in enumerate(codes):
            yield (code if words is None else words[code]), lo + bounds[k], lo + bounds[k + 1]

    def subdirectories(self, column: int, lo: int, hi: int) -> list[tuple[str, int, int]]:
        """Directory names of a column's distinct values within ``lo:hi``, with their rows."""
        dim = self.dimensions[len(self.fixed) + column]
        groups = self.groups(column, lo, hi)
        return [(dimension_dir(dim, value), start, stop) for value, start, stop in groups]

    def files(self, lo: int, hi: int) -> list[tuple[str, int, int]]:
        """File names of the artifacts of datasets ``lo:hi``, with artifact and dataset numbers."""
        out = []
        starts = self.art_start[lo : hi + 1].tolist()
        for k, row in enumerate(range(lo, hi)):
            a0, a1 = starts[k], starts[k + 1]
            if a0 == a1:
                continue
            values = [v for _, v in self.data_id(row)]
            for art in range(a0, a1):
                out.append((self._name(row, art, values), art, row))
        return out

    def _name(self, row: int, art: int, values: list[DataIdValue]) -> str:
        ext = self.exts[int(self.art_exts[art])]
        name = file_name(self.dataset_type, values, ext, self.components[int(self.art_components[art])])
        if self.duplicate[row]:
            # Several datasets share this data ID (calibrations certified for several
            # validity ranges): the UUID prefix keeps their names apart.
            stem = name[: len(name) - len(ext)] if ext else name
            name = f"{stem}-{self.ids[row].tobytes().hex()[:8]}{ext}"
        return name

    def find_file(self, lo: int, hi: int, name: str) -> tuple[int, int] | None:
        """The ``(row, artifact)`` named ``name`` among datasets ``lo:hi``, if any.

        ``lo:hi`` may span many values of the last dimension (the flat layout): the value
        is read back from the name to narrow the search to its rows.
        """
        depth = len(self.fixed)
        last = len(self.dimensions) - 1
        if hi - lo > 8 and last >= depth:
            column = last - depth
            as_int = self.vocab[column] is None
            for value in candidate_values(name, as_int, lambda v: self.code_of(column, v) is not None):
                start, stop = self.rows_with(column, lo, hi, value)
                found = self._scan(start, stop, name)
                if found is not None:
                    return found
            return None
        return self._scan(lo, hi, name)

    def _scan(self, lo: int, hi: int, name: str) -> tuple[int, int] | None:
        for file, art, row in self.files(lo, hi):
            if file == name:
                return row, art
        return None

    def dataset_id(self, row: int) -> uuid.UUID:
        """The UUID of dataset ``row``."""
        return uuid.UUID(bytes=self.ids[row].tobytes())

    def run(self, row: int) -> str:
        """The RUN collection of dataset ``row``."""
        return self.runs[int(self.run_codes[row])]

    def mtime(self, row: int) -> float:
        """The mtime of dataset ``row``'s files: its ingest date, or when it was listed."""
        return float(self.mtimes[row]) if self.mtimes is not None else self.listed_at

    def artifact(self, art: int) -> tuple[int, str, int, str | None, str | None]:
        """``(store, path, size, component, checksum)`` of artifact ``art``."""
        return (
            int(self.art_stores[art]),
            self.path(art),
            int(self.art_sizes[art]),
            self.components[int(self.art_components[art])],
            self.checksums.get(art),
        )

    def path(self, art: int) -> str:
        """The datastore path of artifact ``art``, as its record gives it."""
        block = art // PATH_BLOCK
        base = int(self.art_path_start[block * PATH_BLOCK])
        start, stop = int(self.art_path_start[art]) - base, int(self.art_path_start[art + 1]) - base
        return self._path_block(block)[start:stop].decode()

    def _path_block(self, block: int) -> bytes:
        """The paths of artifacts ``block * PATH_BLOCK`` on (at most `PATH_BLOCK`), end to end."""
        lo, hi = int(self.art_path_blocks[block]), int(self.art_path_blocks[block + 1])
        return zlib.decompress(self.art_paths[lo:hi])

    # -- on disk ------------------------------------------------------------------------------

    _ARRAYS = (
        "ids", "run_codes", "duplicate", "art_start", "art_path_start", "art_path_blocks", "art_sizes",
        "art_stores", "art_components", "art_exts",
    )  # fmt: skip

    def to_bytes(self) -> bytes:
        """Serialise (zlib-compressed JSON header + raw little-endian arrays)."""
        arrays: list[tuple[str, np.ndarray]] = [(name, getattr(self, name)) for name in self._ARRAYS]
        arrays += [(f"column{k}", c) for k, c in enumerate(self.columns)]
        if self.mtimes is not None:
            arrays.append(("mtimes", self.mtimes))
        layout = []
        body = bytearray()
        for name, array in arrays:
            data = np.ascontiguousarray(array).tobytes()
            layout.append([name, array.dtype.str, list(array.shape), len(body), len(data)])
            body += data
        layout.append(["art_paths", "|u1", [len(self.art_paths)], len(body), len(self.art_paths)])
        body += self.art_paths
        header = json.dumps(
            {
                "dataset_type": self.dataset_type,
                "dimensions": list(self.dimensions),
                "fixed": [list(kv) for kv in self.fixed],
                "vocab": self.vocab,
                "runs": self.runs,
                "listed_at": self.listed_at,
                "components": self.components,
                "exts": self.exts,
                "checksums": {str(k): v for k, v in self.checksums.items()},
                "arrays": layout,
            }
        ).encode()
        return _HEADER.pack(_MAGIC, FORMAT_VERSION, len(header)) + zlib.compress(header + bytes(body), 1)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Chunk:
        """Inverse of `to_bytes`.

        Raises
        ------
        ValueError
            Raised if ``blob`` is not a chunk of this format version, or is damaged.
        """
        try:
            magic, version, header_len = _HEADER.unpack_from(blob)
            if magic != _MAGIC or version != FORMAT_VERSION:
                raise ValueError("not a butlerfs chunk of this version")
            data = zlib.decompress(blob[_HEADER.size :])
            header = json.loads(data[:header_len])
            body = memoryview(data)[header_len:]
            arrays: dict[str, Any] = {}
            allowed = {"<i8", "<i4", "<i2", "|u1", "|b1", "<f8"}
            for name, dtype, shape, offset, length in header["arrays"]:
                if dtype not in allowed or offset < 0 or offset + length > len(body):
                    raise ValueError(f"bad array {name!r}")
                array = np.frombuffer(body[offset : offset + length], dtype=np.dtype(dtype))
                arrays[name] = array.reshape(shape)
            paths = arrays.pop("art_paths").tobytes()
            columns = [arrays.pop(f"column{k}") for k in range(len(header["vocab"]))]
            chunk = cls(
                dataset_type=header["dataset_type"],
                dimensions=tuple(header["dimensions"]),
                fixed=tuple((k, v) for k, v in header["fixed"]),
                columns=columns,
                vocab=header["vocab"],
                runs=header["runs"],
                mtimes=arrays.pop("mtimes", None),
                listed_at=float(header["listed_at"]),
                art_paths=paths,
                components=header["components"],
                exts=header["exts"],
                checksums={int(k): v for k, v in header["checksums"].items()},
                **{name: arrays[name] for name in cls._ARRAYS},
            )
            _check(chunk)
        except (KeyError, TypeError, struct.error, zlib.error, json.JSONDecodeError) as err:
            raise ValueError(f"damaged chunk: {err}") from None
        return chunk


def _check(chunk: Chunk) -> None:
    """Raise `ValueError` unless every row, name and path of a loaded chunk can be read.

    A blob that decompresses and parses can still be wrong (a bug, a hand-edited index):
    it must fail here, and be fetched again, rather than load and then fail in a lookup
    or a listing. This decompresses every block of paths once (about as long as reading
    the blob itself), so that `Chunk.path` cannot fail later.
    """
    n, arts = len(chunk.ids), len(chunk.art_sizes)
    per_row = [chunk.run_codes, chunk.duplicate, *chunk.columns]
    if chunk.mtimes is not None:
        per_row.append(chunk.mtimes)
    per_art = [chunk.art_stores, chunk.art_components, chunk.art_exts]
    offsets = [chunk.art_start, chunk.art_path_start, chunk.art_path_blocks]
    integers = [*per_art, *offsets, chunk.art_sizes, chunk.run_codes, *chunk.columns]
    blocks = chunk.art_path_blocks
    if (
        chunk.ids.shape != (n, 16)
        or chunk.ids.dtype != np.uint8
        or any(a.shape != (n,) for a in per_row)
        or chunk.art_sizes.shape != (arts,)
        or any(a.shape != (arts,) for a in per_art)
        or chunk.art_start.shape != (n + 1,)
        or chunk.art_path_start.shape != (arts + 1,)
        or blocks.shape != (-(-arts // PATH_BLOCK) + 1,)
        or len(chunk.columns) != len(chunk.dimensions) - len(chunk.fixed)
        or any(a.dtype.kind != "i" for a in integers)
    ):
        raise ValueError("damaged chunk: inconsistent lengths or types")
    for array, end in ((chunk.art_start, arts), (blocks, len(chunk.art_paths)), (chunk.art_path_start, None)):
        if array[0] != 0 or np.any(np.diff(array) < 0) or (end is not None and array[-1] != end):
            raise ValueError("damaged chunk: bad offsets")
    bounds = [(chunk.run_codes, len(chunk.runs)), (chunk.art_components, len(chunk.components))]
    bounds += [(chunk.art_exts, len(chunk.exts))]
    bounds += [(c, len(v)) for c, v in zip(chunk.columns, chunk.vocab, strict=True) if v is not None]
    if any(len(a) and (a.min() < 0 or a.max() >= size) for a, size in bounds):
        raise ValueError("damaged chunk: a code out of range")
    starts = chunk.art_path_start
    for k in range(len(blocks) - 1):
        first, last = k * PATH_BLOCK, min((k + 1) * PATH_BLOCK, arts)
        try:
            text = chunk._path_block(k)
        except zlib.error as err:
            raise ValueError(f"damaged chunk: paths: {err}") from None
        if len(text) != starts[last] - starts[first]:
            raise ValueError("damaged chunk: paths of the wrong length")


def candidate_values(name: str, as_int: bool, has: Callable[[DataIdValue], bool]) -> Iterator[DataIdValue]:
    """Values of the last dimension that the file name ``name`` could encode.

    A name is ``<type>[.<component>]_<v1>_..._<vn>[-<uuid8>]<ext>``: ``vn`` starts after
    some ``_`` and ends at a ``.``, a ``-`` or the end. Only values for which ``has`` is
    true are returned; the caller checks each by making the names of its rows.
    """
    seen: set[DataIdValue] = set()
    for i, ch in enumerate(name):
        if ch != "_":
            continue
        rest = name[i + 1 :]
        for j in [k for k, c in enumerate(rest) if c in ".-"] + [len(rest)]:
            text = rest[:j]
            try:
                value = decode_value(text, as_int=as_int) if text else None
            except ValueError:
                continue
            if value is None or value in seen or encode_value(value) != text:
                continue
            if has(value):
                seen.add(value)
                yield value
