"""A private PostgreSQL server for tests and benchmarks: Debian's binaries in a temporary directory.

``PostgresServer`` runs ``initdb`` and ``postgres`` from ``/usr/lib/postgresql/*/bin`` (Debian's
``postgresql`` package) in a fresh directory, on a free 127.0.0.1 port, with no Unix socket and no
system service. It creates databases with ``btree_gist`` (daf_butler needs it), can stop and start
the server again on the same port (registry-fault tests), and on `cleanup` stops it by PID and
deletes its files.

``initdb`` and ``postgres`` refuse to run as root: as root the server runs as the ``postgres``
system account (else ``nobody``), which owns the data directory; as anyone else it runs as the
current user. Connections are trusted (no password) unless ``password`` is given, which turns on
SCRAM authentication over TCP.

Usable from tests (``tests/conftest.py`` puts this directory on ``sys.path``), from
``scripts/bench/``, and from the shell: ``python scripts/pgserver.py`` starts a server, prints
its URL and keeps it until Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["PostgresServer", "find_bindir", "free_port"]

SUPERUSER = "butlerfs"
"""The server's superuser role; connect as it."""

_LIVE: set[PostgresServer] = set()


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_bindir() -> Path:
    """Return the newest ``/usr/lib/postgresql/N/bin`` holding ``initdb`` and ``postgres``.

    Raises
    ------
    FileNotFoundError
        Raised (naming the Debian packages) when no PostgreSQL server is installed.
    """
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if (d / "postgres").exists()]
    if not found:
        raise FileNotFoundError(
            "no PostgreSQL server in /usr/lib/postgresql/*/bin: install the Debian packages "
            "postgresql and postgresql-contrib (make setup does as root)"
        )
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0)


def _service_account() -> pwd.struct_passwd | None:
    """The account the server runs as: `None` for the current user, a system account for root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root, but neither a 'postgres' nor a 'nobody' account exists")


class PostgresServer:
    """One PostgreSQL server in its own directory, on 127.0.0.1.

    Parameters
    ----------
    parent : `str`, optional
        Directory in which the server's directory is made (default: the system's temporary
        directory). As root it must be searchable by the ``postgres`` account.
    port : `int`, optional
        Port to listen on; a free one by default.
    password : `str`, optional
        If given, TCP connections must authenticate with it (SCRAM); otherwise they are trusted.
    durable : `bool`, optional
        Keep ``fsync`` on. Off by default: the data is thrown away anyway, and loading
        benchmark repositories goes several times faster.

    Examples
    --------
    >>> with PostgresServer() as server:  # doctest: +SKIP
    ...     url = server.create_database("demo")
    """

    def __init__(
        self,
        parent: str | None = None,
        *,
        port: int | None = None,
        password: str | None = None,
        durable: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.password = password
        self._durable = durable
        self._bindir = find_bindir()
        self._account = _service_account()
        self.directory = Path(tempfile.mkdtemp(prefix="pgserver-", dir=parent))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.process: subprocess.Popen | None = None
        self._databases: set[str] = set()
        _LIVE.add(self)
        if self._account is not None:
            os.chown(self.directory, self._account.pw_uid, self._account.pw_gid)
            self._check_reachable()
        self._initdb()

    # -- lifecycle --------------------------------------------------------------------------------

    def _popen_args(self) -> dict[str, Any]:
        """Arguments of `subprocess` that run a command as the server's account."""
        args: dict[str, Any] = {"cwd": str(self.directory), "stdin": subprocess.DEVNULL}
        if self._account is not None:
            args.update(user=self._account.pw_uid, group=self._account.pw_gid, extra_groups=[])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8", TZ="UTC")
        args["env"] = env
        return args

    def _check_reachable(self) -> None:
        assert self._account is not None
        probe = subprocess.run(["test", "-w", str(self.directory)], **self._popen_args())
        if probe.returncode != 0:
            self.cleanup()
            raise RuntimeError(
                f"the {self._account.pw_name} account cannot reach {self.directory}: "
                "give a parent directory that it can search (e.g. /tmp)"
            )

    def _initdb(self) -> None:
        argv = [
            str(self._bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--auth-local=trust",
            "--no-instructions",
        ]
        if self.password is not None:
            pwfile = self.directory / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._account is not None:
                os.chown(pwfile, self._account.pw_uid, self._account.pw_gid)
            argv += ["--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        else:
            argv += ["--auth-host=trust"]
        result = subprocess.run(argv, capture_output=True, text=True, **self._popen_args())
        if result.returncode != 0:
            self.cleanup()
            raise RuntimeError(f"initdb failed ({result.returncode}): {result.stderr.strip()[-2000:]}")

    def start(self, timeout: float = 60.0) -> PostgresServer:
        """Start the server (again, on the same port after `stop`) and wait until it accepts queries."""
        assert not self.running, "already running"
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": "200",
            "fsync": "on" if self._durable else "off",
            "synchronous_commit": "on" if self._durable else "off",
            "full_page_writes": "on" if self._durable else "off",
        }
        argv = [str(self._bindir / "postgres"), "-D", str(self.data)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, **self._popen_args())
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                status = self.process.returncode
                raise RuntimeError(f"postgres exited with status {status}:\n{self.log_tail()}")
            if self._ready():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not accept connections in {timeout} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        result = subprocess.run(
            [str(self._bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-t", "1"],
            capture_output=True,
        )
        return result.returncode == 0

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Stop the server by its PID; its data stays for `start`.

        Parameters
        ----------
        mode : `str`
            ``"fast"`` (SIGINT: roll back and disconnect clients) or ``"immediate"`` (SIGQUIT:
            as if the machine lost power, recovered at the next start).
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        sig = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)

    def restart(self) -> PostgresServer:
        """Stop and start the server on the same port."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop the server and delete its directory (idempotent)."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
        _LIVE.discard(self)

    def __enter__(self) -> PostgresServer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- databases --------------------------------------------------------------------------------

    def url(self, database: str = "postgres", *, user: str = SUPERUSER, password: str | None = None) -> str:
        """Return the SQLAlchemy URL of a database on this server (the password, if any, included)."""
        password = self.password if password is None else password
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with ``psql`` and return its output (unaligned, tuples only)."""
        env = dict(os.environ, PGPASSWORD=self.password or "", PGCONNECT_TIMEOUT="10")
        result = subprocess.run(
            [
                str(self._bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                database,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str) -> str:
        """Create a database with the ``btree_gist`` extension and return its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: use letters, digits and underscores")
        self.psql(f'CREATE DATABASE "{name}"')
        self.psql("CREATE EXTENSION IF NOT EXISTS btree_gist", database=name)
        self._databases.add(name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting its clients."""
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._databases.discard(name)

    def log_tail(self, lines: int = 20) -> str:
        """Return the end of the server's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@atexit.register
def _cleanup_all() -> None:
    # A test run that dies between start and cleanup still stops its servers.
    for server in list(_LIVE):
        server.cleanup()


def main() -> None:
    """Start a server, print its URL, and keep it until Ctrl-C or SIGTERM."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--database", default="butlerfs", help="database to create (with btree_gist)")
    parser.add_argument("--port", type=int, help="port (default: a free one)")
    parser.add_argument("--parent", help="directory for the server's files (default: the temp dir)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with PostgresServer(args.parent, port=args.port) as server:
        print(server.create_database(args.database), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
