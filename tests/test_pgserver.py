"""The private PostgreSQL server of the tests and benchmarks (``scripts/pgserver.py``)."""

from __future__ import annotations

import os

import psutil
import pytest
from conftest import require
from pgserver import PostgresServer, find_bindir

psycopg = pytest.importorskip("psycopg")


def test_lifecycle_restart_and_cleanup() -> None:
    require(os.path.isdir("/usr/lib/postgresql"), "Debian's postgresql (run make setup)")
    find_bindir()
    server = PostgresServer(password="secret")
    try:
        server.start()
        pid = server.process.pid
        # Never as root: initdb and postgres refuse it, so root runs them as a system account.
        owner = psutil.Process(pid).uids().effective
        assert owner != 0 and (os.geteuid() == 0 or owner == os.geteuid())
        url = server.create_database("lifecycle")
        with psycopg.connect(url) as conn:
            extensions = {row[0] for row in conn.execute("SELECT extname FROM pg_extension")}
            assert "btree_gist" in extensions
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(server.url("lifecycle", password="wrong"), connect_timeout=5)

        server.stop()
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        with pytest.raises(psycopg.OperationalError, match="refused"):
            psycopg.connect(url, connect_timeout=5)

        port = server.port
        server.start()  # same port, same data
        assert server.port == port
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
        server.drop_database("lifecycle")
        with pytest.raises(psycopg.OperationalError, match='database "lifecycle" does not exist'):
            psycopg.connect(url, connect_timeout=5)
        pid = server.process.pid
    finally:
        server.cleanup()
    assert not server.directory.exists()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
