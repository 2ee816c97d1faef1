"""The persistent listing index: what a mount fetched, kept on disk for the next mount.

One SQLite file per mount query (repository, search path, dataset types, ``--where``,
subtree limit), named by a digest of it, like ratarmount's index per archive. It holds:

* per dataset type, the registry state token (`butlerfs.registry.RepoIndex.state`) the
  stored listings were fetched under;
* the listings themselves, one row per loaded node: a `~butlerfs.listing.Chunk` blob, or
  a directory's distinct values (JSON), keyed by where the node sits in the tree.

A listing is read back only under the token it was stored with; when a type's token
changes, its rows are deleted. Any fault (a damaged file, a full or read-only disk) is
logged once and turns the index off for the mount, which then lists from the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Mapping
from typing import Any

from .listing import FORMAT_VERSION

__all__ = ["DiskIndex", "index_file"]

_LOG = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_VERSION = f"{SCHEMA_VERSION}.{FORMAT_VERSION}"
# Stored in the file: a file of another schema or chunk format is emptied when opened, so a
# new butlerfs reads none of an older one's listings (rather than discarding each as damaged).

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS types (name TEXT PRIMARY KEY, token TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    key TEXT PRIMARY KEY, dataset_type TEXT NOT NULL, token TEXT NOT NULL, data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS nodes_by_type ON nodes (dataset_type);
"""


def index_file(directory: str, signature: Mapping[str, Any]) -> str:
    """Return the index file of a mount query in ``directory``."""
    text = json.dumps(signature, sort_keys=True)
    return os.path.join(directory, f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.sqlite")


class DiskIndex:
    """Stored listings of one mount query.

    Parameters
    ----------
    directory : `str`
        Where index files live (created, mode 0700).
    signature : `~collections.abc.Mapping`
        The mount query (`butlerfs.registry.RepoIndex.signature` plus the subtree
        limit); it names the file, and a file holding another signature is replaced.
    """

    def __init__(self, directory: str, signature: Mapping[str, Any]) -> None:
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self.path = index_file(directory, signature)
        text = json.dumps(signature, sort_keys=True)
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self._db = self._open(text)
        except (sqlite3.Error, OSError) as err:
            self._fail(f"cannot use the listing index {self.path}: {err}")

    def _open(self, signature: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("signature") != signature or meta.get("version") != _VERSION:
                # Another query or format under this name (a digest collision, an old file).
                db.executescript("DELETE FROM nodes; DELETE FROM types; DELETE FROM meta;")
                db.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("signature", signature), ("version", _VERSION)],
                )
        except sqlite3.Error:
            db.close()
            raise
        return db

    def _fail(self, message: str) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        _LOG.warning("%s; listing from the registry only", message)

    @property
    def enabled(self) -> bool:
        """Whether the index is usable (it turns itself off after a fault)."""
        return self._db is not None

    def token(self, dataset_type: str) -> str | None:
        """Return the state token the stored listings of a type were fetched under."""
        row = self._query("SELECT token FROM types WHERE name = ?", (dataset_type,))
        return row[0] if row else None

    def set_token(self, dataset_type: str, token: str) -> None:
        """Record a type's current token and forget its listings stored under another."""
        self._write(
            [
                ("DELETE FROM nodes WHERE dataset_type = ? AND token != ?", (dataset_type, token)),
                ("INSERT OR REPLACE INTO types VALUES (?, ?)", (dataset_type, token)),
            ]
        )

    def retag(self, dataset_type: str, old: str, new: str) -> None:
        """Keep a type's listings stored under ``old`` as fetched under the equivalent ``new``."""
        self._write(
            [
                ("UPDATE nodes SET token = ? WHERE dataset_type = ? AND token = ?", (new, dataset_type, old)),
                ("INSERT OR REPLACE INTO types VALUES (?, ?)", (dataset_type, new)),
            ]
        )

    def get(self, key: str, token: str) -> bytes | None:
        """Return the stored listing ``key`` if it was fetched under ``token``."""
        row = self._query("SELECT data FROM nodes WHERE key = ? AND token = ?", (key, token))
        return bytes(row[0]) if row else None

    def put(self, key: str, dataset_type: str, token: str, data: bytes) -> None:
        """Store a listing fetched under ``token``."""
        self._write([("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?)", (key, dataset_type, token, data))])

    def discard(self, key: str) -> None:
        """Forget one stored listing (it could not be read back)."""
        self._write([("DELETE FROM nodes WHERE key = ?", (key,))])

    def _query(self, sql: str, args: tuple[Any, ...]) -> Any:
        with self._lock:
            if self._db is None:
                return None
            try:
                return self._db.execute(sql, args).fetchone()
            except sqlite3.Error as err:
                self._fail(f"reading the listing index {self.path} failed: {err}")
                return None

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            if self._db is None:
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except sqlite3.Error as err:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                self._fail(f"writing the listing index {self.path} failed: {err}")

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
