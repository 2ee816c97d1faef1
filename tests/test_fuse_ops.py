"""The FUSE adapter's answers to READDIRPLUS, called as libfuse calls them, without a mount."""

from __future__ import annotations

import collections
import stat
import threading
from types import SimpleNamespace

from butlerfs import fuse_ops
from butlerfs.source import Entry


class _Source:
    """A directory of ``n`` files; counts how often it was listed."""

    owner = (1000, 1000)

    def __init__(self, n: int) -> None:
        self.entries = [Entry(f"f{i:04d}.fits", stat.S_IFREG | 0o444, 2880, 1.5e9) for i in range(n)]
        self.listed = 0

    def scandir(self, path: str) -> list[Entry]:
        self.listed += 1
        return list(self.entries)


def _adapter(source: _Source) -> fuse_ops._ZeroCopyFUSE:
    # What _ZeroCopyFUSE.__init__ sets before mfusepy mounts (which a unit test must not do).
    fuse = object.__new__(fuse_ops._ZeroCopyFUSE)
    fuse._listings = collections.OrderedDict()
    fuse._listings_lock = threading.Lock()
    fuse._listed = 0
    fuse.operations = SimpleNamespace(source=source)
    fuse.encoding, fuse.errors = "utf-8", "surrogateescape"
    return fuse


def _read(fuse: fuse_ops._ZeroCopyFUSE, path: bytes, per_request: int) -> list[bytes]:
    """Read a directory as the kernel does: requests of ``per_request`` entries until one is empty."""
    names: list[bytes] = []
    offset = 0
    while True:
        got: list[tuple[bytes, int]] = []

        def filler(buf, name, st, position, flags, got=got):
            if len(got) == per_request:
                return 1  # the kernel's buffer is full
            got.append((name, position))
            return 0

        assert fuse.readdir_fuse_3(path, None, filler, offset, None, fuse_ops._READDIR_PLUS) == 0
        if not got:
            return names
        names += [name for name, _ in got]
        offset = got[-1][1]


def test_a_listing_is_kept_while_read_and_dropped_once_read_to_the_end():
    source = _Source(100)
    fuse = _adapter(source)
    names = _read(fuse, b"/calexp/detector_1", per_request=7)
    assert names == [b".", b"..", *(e.name.encode() for e in source.entries)]
    assert source.listed == 1  # the 15 requests that continued it used the listing kept
    assert not fuse._listings and fuse._listed == 0  # nothing held once the reader is done


def test_a_reader_that_stops_early_leaves_its_listing_for_the_next_request():
    source = _Source(50)
    fuse = _adapter(source)

    def stop_after_first(buf, name, st, position, flags):
        return 1 if position > 10 else 0

    fuse.readdir_fuse_3(b"/d", None, stop_after_first, 0, None, fuse_ops._READDIR_PLUS)
    assert list(fuse._listings) == [b"/d"] and fuse._listed == 50
    # An empty directory is dropped too once its end is asked for.
    empty = _adapter(_Source(0))
    assert _read(empty, b"/e", per_request=5) == [b".", b".."]
    assert not empty._listings and empty._listed == 0
