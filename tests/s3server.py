"""Real S3 endpoints for tests and benchmarks, each in its own process.

`MotoServer` is ``python -m moto.server``; `FileS3Server` is ``scripts/s3_file_server.py``,
whose objects are files, so that a GET costs the same whatever the object's size, as on
S3 (moto copies the whole object for every GET). Either is an HTTP process on 127.0.0.1
that tests can kill, pause (SIGSTOP) and restart on the same port; `TcpProxy` in front
adds latency, per-connection bandwidth, counters or stalls. Moto keeps its state in
memory, so `Snapshot` keeps a local copy of a bucket's objects to upload again after a
restart. Processes are stopped by their PID, never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import boto3
import botocore.config

ACCESS_KEY = "testing-key"
SECRET_KEY = "testing-secret"
REGION = "us-east-1"
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
TCP_PROXY = SCRIPTS / "tcp_proxy.py"
FILE_SERVER = SCRIPTS / "s3_file_server.py"


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def _stop(process: subprocess.Popen | None) -> None:
    """Stop one process we started, by its PID, and reap it."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)  # a paused process cannot handle SIGTERM
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


class MotoServer:
    """``python -m moto.server`` on 127.0.0.1.

    Parameters
    ----------
    port : `int`, optional
        Port to listen on; a free one by default.
    env : `~collections.abc.Mapping`, optional
        Extra environment of the server (``INITIAL_NO_AUTH_ACTION_COUNT`` ...).
    """

    def __init__(self, port: int | None = None, env: Mapping[str, str] | None = None) -> None:
        self.port = port or free_port()
        self._env = dict(env or {})
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        """The server's URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        """Start the server (on the same port after a `kill`) and wait until it listens."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, **self._env),
        )
        _wait_for_port(self.port, self.process)
        return self

    def kill(self) -> None:
        """Kill the server at once (the endpoint goes down, its state is lost)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def pause(self) -> None:
        """Stop the server with SIGSTOP: connections are accepted, never answered."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Undo `pause`."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server if it runs."""
        _stop(self.process)

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        """Return a boto3 S3 client of this server (independent of the environment)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name=REGION,
            config=botocore.config.Config(retries={"total_max_attempts": 2}),
        )

    def environ(self, endpoint: str | None = None) -> dict[str, str]:
        """Return the variables that point S3 clients (and the daemon) at this server."""
        return {
            "S3_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }


class FileS3Server(MotoServer):
    """``scripts/s3_file_server.py`` on 127.0.0.1: objects are files under ``root``.

    Parameters
    ----------
    root : `pathlib.Path`
        Where the buckets live; objects survive a restart (unlike moto's).
    port : `int`, optional
        Port to listen on; a free one by default.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        super().__init__(port)
        self.root = root

    def start(self) -> FileS3Server:
        """Start the server (on the same port after a `kill`) and wait until it listens."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.process = subprocess.Popen(
            [sys.executable, str(FILE_SERVER), "--root", str(self.root),
             "--listen", f"127.0.0.1:{self.port}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, self.process)
        return self

    def stats(self) -> dict:
        """The server's counters: requests per operation, body bytes sent."""
        import json
        import urllib.request

        with urllib.request.urlopen(f"{self.endpoint}/_stats", timeout=10) as response:
            return json.loads(response.read())


class TcpProxy:
    """``scripts/tcp_proxy.py`` in front of a port (delays, bandwidth, counters, stalls).

    Parameters
    ----------
    target_port : `int`
        The server's port on 127.0.0.1.
    *args : `str`
        More options of the proxy (``--delay-ms``, ``--bandwidth-mbps``, ``--stall``).
    port : `int`, optional
        Port to listen on; a free one by default.
    """

    def __init__(self, target_port: int, *args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.control_port = free_port()
        self.target_port = target_port
        self.args = args
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        """The proxy's URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        """Start the proxy and wait until it listens."""
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(TCP_PROXY),
                "--listen",
                f"127.0.0.1:{self.port}",
                "--target",
                f"127.0.0.1:{self.target_port}",
                "--control",
                f"127.0.0.1:{self.control_port}",
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, self.process)
        _wait_for_port(self.control_port, self.process)
        return self

    def counters(self) -> dict[str, int]:
        """Connections, requests and bytes each way (``bytes_down``: server to client) so far."""
        import json

        with socket.create_connection(("127.0.0.1", self.control_port), timeout=10) as sock:
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        return json.loads(data)

    def toggle_stall(self) -> None:
        """Start or stop stalling (SIGUSR1)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGUSR1)

    def stop(self) -> None:
        """Stop the proxy if it runs."""
        _stop(self.process)


class Snapshot:
    """A local copy of the objects of buckets, to restore after a server restart.

    Parameters
    ----------
    directory : `pathlib.Path`
        Where the copies go (one file per object, named by number: keys such as
        ``a/`` and ``a/b`` cannot both be paths).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.objects: dict[tuple[str, str], Path] = {}

    def take(self, client, bucket: str, max_size: int | None = None) -> None:
        """Download the objects of ``bucket`` (those up to ``max_size`` bytes)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                if max_size is not None and item["Size"] > max_size:
                    continue
                target = self.directory / f"{len(self.objects):06d}"
                client.download_file(bucket, item["Key"], str(target))
                self.objects[bucket, item["Key"]] = target

    def restore(self, client) -> None:
        """Create the buckets and upload the objects again."""
        for bucket in sorted({bucket for bucket, _ in self.objects}):
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=bucket)
        for (bucket, key), path in self.objects.items():
            client.upload_file(str(path), bucket, key)


@contextlib.contextmanager
def running(*servers: MotoServer | TcpProxy) -> Iterator[None]:
    """Stop ``servers`` (already started) on exit, whatever happens."""
    try:
        yield
    finally:
        for server in reversed(servers):
            server.stop()


def make_fits(path: Path, shape: tuple[int, int], title: str) -> None:
    """Write a valid int16 FITS image of zeros (``OBJECT = title``) without holding it in memory."""
    from astropy.io import fits

    header = fits.Header()
    for key, value in (("SIMPLE", True), ("BITPIX", 16), ("NAXIS", 2)):
        header[key] = value
    header["NAXIS1"], header["NAXIS2"] = shape[1], shape[0]
    header["OBJECT"] = title
    data_size = shape[0] * shape[1] * 2
    with open(path, "wb") as stream:
        stream.write(header.tostring().encode())
        stream.truncate(stream.tell() + data_size + (-data_size) % 2880)


def put_extra_datasets(
    root: str,
    staging: Path,
    run: str,
    *,
    big: tuple[str, tuple[int, int], str],
    medium: tuple[str, int, tuple[int, ...]],
    seed: int,
) -> None:
    """Put a big FITS and multi-block random files into the demo repository ``root``, in ``run``.

    ``big`` is (dataset type, image shape, ``OBJECT``), for detector 0; ``medium`` is
    (dataset type, size in bytes, detectors), their bytes from ``numpy``'s generator ``seed``.
    """
    import numpy as np
    from lsst.daf.butler import Butler, DatasetType

    from butlerfs.demo import INSTRUMENT
    from butlerfs.formatter import put_source_extension

    (big_type, shape, title), (medium_type, size, detectors) = big, medium
    butler = Butler.from_config(root, writeable=True)
    try:
        butler.collections.register(run)
        types = {}
        for name in (medium_type, big_type):
            dimensions = ["instrument", "detector"]
            types[name] = DatasetType(name, dimensions, "ButlerfsFile", universe=butler.dimensions)
            butler.registry.registerDatasetType(types[name])
        rng = np.random.default_rng(seed)
        for detector in detectors:
            path = staging / f"medium{detector}.bin"
            path.write_bytes(rng.bytes(size))
            with put_source_extension(path) as uri:
                butler.put(uri, types[medium_type], instrument=INSTRUMENT, detector=detector, run=run)
        path = staging / "big.fits"
        make_fits(path, shape, title)
        with put_source_extension(path) as uri:
            butler.put(uri, types[big_type], instrument=INSTRUMENT, detector=0, run=run)
    finally:
        butler.close()
