"""PostgreSQL registries: the demo built into a real server, and registry faults.

The session's server (``pg_server`` in conftest) holds ``demo_pg``, which must show what the
SQLite ``demo`` shows. Fault tests use a server of this module's own, with password
authentication, which they stop and start again on the same port (``scripts/pgserver.py``);
its repository is built with ``butlerfs demo-repo --registry``.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import DEFAULTS, require_fuse, require_postgres, run_cli
from test_cli_errors import _assert_clean_error, _assert_not_mounted

import butlerfs

pytestmark = pytest.mark.fuse

PASSWORD = "not-a-secret"
REFRESH = 1.0  # seconds a listing is trusted: the fault tests wait this long for a listing to go stale


@dataclasses.dataclass
class Faulty:
    server: object  # pgserver.PostgresServer
    url: str
    root: Path

    @property
    def location(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def variant(self, directory: Path, old: str, new: str) -> str:
        """A copy of the repository's ``butler.yaml`` with ``old`` replaced; return its directory."""
        text = (self.root / "butler.yaml").read_text()
        assert old in text, old
        directory.mkdir()
        (directory / "butler.yaml").write_text(text.replace(old, new))
        return str(directory)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    """A private server with a demo repository built by ``butlerfs demo-repo --registry``."""
    require_postgres()
    from pgserver import PostgresServer

    with PostgresServer(password=PASSWORD) as server:
        url = server.create_database("faults")
        root = tmp_path_factory.mktemp("pg-faults") / "repo"
        args = ["--visits", "1", "--detectors", "2", "--image-size", "64"]
        built = run_cli("demo-repo", str(root), "--registry", url, *args)
        assert built.returncode == 0, built.stderr
        assert "calexp: 2 datasets" in built.stdout
        yield Faulty(server, url, root)


@pytest.fixture
def running_after(faulty: Faulty) -> Iterator[Faulty]:
    """The module's server, started again after the test whatever happened."""
    yield faulty
    if not faulty.server.running:
        faulty.server.start()


def _walk(source, path: str = "/") -> dict[str, tuple[int, str]]:
    """Every file of a source, as a mount lists it: path -> (size, dataset ID)."""
    from butlerfs.source import File

    found = {}
    for name, node in source.listdir(path):
        child = f"{path.rstrip('/')}/{name}"
        if isinstance(node, File):
            found[child] = (node.size, str(node.dataset.id))
        else:
            found.update(_walk(source, child))
    return found


def test_postgresql_registry_shows_what_sqlite_shows(demo, demo_pg):
    from butlerfs.registry import RepoIndex
    from butlerfs.source import ButlerSource

    assert "postgresql://" in (Path(demo_pg.root) / "butler.yaml").read_text()
    trees = []
    for repo in (demo, demo_pg):
        index = RepoIndex(repo.root, [DEFAULTS])
        source = ButlerSource(index)
        try:
            # Records come from the one joined query on both databases, not the fallback.
            records = index.datastore._records  # type: ignore[attr-defined]
            assert records and all(query is not None for query in records)
            trees.append(_walk(source))
        finally:
            source.close()
    # Same seed, same UUIDv5 dataset IDs, same bytes: only the registry database differs.
    assert trees[0] == trees[1]
    assert len(trees[0]) > sum(demo.dataset_counts.values())


def test_demo_repo_refuses_an_existing_namespace(faulty, tmp_path):
    from butlerfs.demo import default_namespace

    namespace = default_namespace(str(faulty.root))
    result = run_cli("demo-repo", str(tmp_path / "other"), "--registry", faulty.url, "--namespace", namespace)
    _assert_clean_error(result, f"namespace {namespace}", "exists", "--force")
    assert PASSWORD not in result.stderr, "the password must not be printed"
    assert not (tmp_path / "other").exists()
    from butlerfs.demo import make_demo_repo
    from butlerfs.errors import UsageError

    with pytest.raises(UsageError, match="letters, digits and underscores"):
        make_demo_repo(str(tmp_path / "other"), registry=faulty.url, namespace='a"; DROP SCHEMA x; --')
    assert not (tmp_path / "other").exists()


def test_database_without_btree_gist_is_named(faulty, tmp_path):
    from butlerfs.demo import make_demo_repo
    from butlerfs.errors import UsageError

    faulty.server.psql("CREATE DATABASE nogist")
    with pytest.raises(UsageError, match="lacks the btree_gist extension: run CREATE EXTENSION btree_gist"):
        make_demo_repo(str(tmp_path / "repo"), registry=faulty.server.url("nogist"))
    assert not (tmp_path / "repo").exists(), "nothing half-done"


def test_unreachable_registry_is_one_line_for_mount_run_and_prefetch(running_after, mountpoint, tmp_path):
    require_fuse()
    faulty = running_after
    expected = f"cannot reach the registry at {faulty.location}: connection refused"
    faulty.server.stop()
    root = str(faulty.root)
    mount = run_cli("mount", root, str(mountpoint), "-c", DEFAULTS, "--log-file", str(tmp_path / "d.log"))
    _assert_clean_error(mount, expected)
    _assert_not_mounted(mountpoint)
    run = run_cli(
        "run", root, "-c", DEFAULTS, "-i", "img=calexp", "--workdir", str(tmp_path / "w"), "--", "true"
    )
    _assert_clean_error(run, expected)
    prefetch = run_cli("cache", "prefetch", root, "-c", DEFAULTS, "--cache-dir", str(tmp_path / "cache"))
    _assert_clean_error(prefetch, expected)


def test_wrong_credentials_database_or_namespace_are_one_line(faulty, mountpoint, tmp_path):
    require_fuse()
    from butlerfs.errors import UsageError
    from butlerfs.registry import RepoIndex

    repo = faulty.variant(tmp_path / "password", f":{PASSWORD}@", ":wrong@")
    result = run_cli("mount", repo, str(mountpoint), "-c", DEFAULTS, "--log-file", str(tmp_path / "d.log"))
    reason = 'password authentication failed for user "butlerfs"'
    _assert_clean_error(result, f"cannot reach the registry at {faulty.location}: {reason}")
    assert "wrong" not in result.stderr and PASSWORD not in result.stderr
    _assert_not_mounted(mountpoint)
    # The same translation, in-process (the mount's daemon runs exactly this).
    cases = {
        "database": ("/faults\n", "/nodb\n", 'reach the registry at {}: database "nodb" does not exist'),
        "namespace": ("namespace: demo_", "namespace: nosuch_", 'use the registry at {}: relation "nosuch_'),
    }
    for name, (old, new, expected) in cases.items():
        with pytest.raises(UsageError) as info:
            RepoIndex(faulty.variant(tmp_path / name, old, new), [DEFAULTS])
        message = str(info.value)
        assert message.startswith("cannot " + expected.format(faulty.location)) and "\n" not in message


def test_missing_driver_names_the_extra(faulty, tmp_path):
    # As if psycopg were not installed: the command must say which extra to install.
    code = (
        "import sys; sys.modules['psycopg'] = None; sys.argv[0] = 'butlerfs';"
        "from butlerfs.cli import main; main()"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "cache",
            "prefetch",
            str(faulty.root),
            "-c",
            DEFAULTS,
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
    )
    _assert_clean_error(result, "needs psycopg 3", "butlerfs[postgres]")


def _eio(call, *args) -> None:
    with pytest.raises(OSError) as info:
        call(*args)
    assert info.value.errno == errno.EIO, info.value


def _warnings(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if " WARNING " in line]


def test_registry_outage_while_mounted(running_after, mountpoint, tmp_path):
    require_fuse()
    faulty = running_after
    log = tmp_path / "daemon.log"
    with butlerfs.mount(
        str(faulty.root), str(mountpoint), collections=[DEFAULTS], refresh=REFRESH, log_file=str(log)
    ) as m:
        calexp = Path(m.mountpoint, "calexp")
        files = sorted(p for p in calexp.rglob("*") if p.is_file())
        assert len(files) == 2
        leaf = files[0].parent
        listing = sorted(os.listdir(leaf))
        at_rest = {p: Path(os.getxattr(p, "user.butler.uri").decode().removeprefix("file://")) for p in files}
        assert files[0].read_bytes() == at_rest[files[0]].read_bytes()

        for outage, unlisted in ((1, "raw"), (2, "flat")):
            faulty.server.stop()
            # Never listed: the listing needs the registry.
            _eio(os.listdir, Path(m.mountpoint, unlisted))
            time.sleep(REFRESH + 0.2)  # listings go stale: a missing name now needs the registry
            _eio(os.stat, leaf / "no-such-file.fits")
            _eio(os.stat, Path(m.mountpoint, "bias", "instrument_LSSTCam-imSim"))
            # Listed before: the last listing and the files in it keep working (reads never query).
            assert sorted(os.listdir(leaf)) == listing
            for path in files:
                assert path.read_bytes() == at_rest[path].read_bytes()
            faulty.server.start()
            # Back without a remount.
            assert os.listdir(Path(m.mountpoint, unlisted))
            assert sorted(os.listdir(leaf)) == listing
            warnings = _warnings(log)
            assert len(warnings) == outage, warnings
            assert f"cannot reach the registry at {faulty.location}" in warnings[-1]
    text = log.read_text()
    assert "Traceback" not in text and " ERROR " not in text, text
    assert text.count("answers again") == 2
