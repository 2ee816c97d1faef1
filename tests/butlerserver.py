"""A real Butler server for tests (daf_butler's own, under uvicorn), and a storage host whose
signed URLs expire.

`ButlerServer` runs ``uvicorn --factory lsst.daf.butler.remote_butler.server:create_app`` on
127.0.0.1 in its own process, which tests can kill and start again on the same port; it is
stopped by its PID. `ExpiringStorage` is an HTTP proxy in front of the moto server that the
Butler server signs URLs for: moto never expires a signed URL, the proxy refuses one (HTTP
403, as S3 does) once it is older than `ExpiringStorage.lifetime`, and it records what every
request carried, so tests can check that no token reached the storage host.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from s3server import _stop, _wait_for_port, free_port

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}


class ButlerServer:
    """daf_butler's Butler server under uvicorn, serving repositories by name.

    Parameters
    ----------
    repositories : `~collections.abc.Mapping` [`str`, `str`]
        ``butler.yaml`` of each repository, by the name in its URL.
    s3_environ : `~collections.abc.Mapping` [`str`, `str`]
        ``S3_ENDPOINT_URL`` and ``AWS_*`` of the S3 datastores (and where signed URLs point).
    log : `pathlib.Path`
        The server's output.
    """

    def __init__(self, repositories: Mapping[str, str], s3_environ: Mapping[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        config = {name: {"config_uri": uri, "authorized_groups": ["*"]} for name, uri in repositories.items()}
        self._env = dict(
            os.environ,
            **s3_environ,
            DAF_BUTLER_SERVER_REPOSITORIES=json.dumps(config),
            DAF_BUTLER_SERVER_GAFAELFAWR_URL="DISABLED",
            DAF_BUTLER_SERVER_AUTHENTICATION="rubin_science_platform",
        )
        self.process: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        """Return the URL of one repository, as clients take it."""
        return f"http://127.0.0.1:{self.port}/api/butler/repo/{name}"

    def start(self, ready_repo: str, timeout: float = 120.0) -> ButlerServer:
        """Start the server (on the same port after `kill`) and wait until ``ready_repo`` answers."""
        assert self.process is None or self.process.poll() is not None, "already running"
        uvicorn = Path(sys.executable).with_name("uvicorn")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    str(uvicorn),
                    "--factory",
                    "lsst.daf.butler.remote_butler.server:create_app",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self._env,
            )
        _wait_for_port(self.port, self.process, timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.url(ready_repo) + "/butler.json", timeout=5) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
            time.sleep(0.1)

    def kill(self) -> None:
        """Kill the server at once (the port stops answering)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        """Stop the server if it runs."""
        _stop(self.process)


class ExpiringStorage:
    """An HTTP proxy in front of an S3 endpoint whose signed URLs expire.

    A signed URL is identified by its signature; it is refused with 403 once ``lifetime``
    seconds have passed since the proxy first saw it (`None`: never).

    Parameters
    ----------
    target_port : `int`
        The moto server's port on 127.0.0.1.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.lifetime: float | None = None
        self._lock = threading.Lock()
        self._first_seen: dict[str, float] = {}
        self.requests = 0
        self.refused = 0
        self.header_names: set[str] = set()
        """Every request header name seen (lower case)."""
        self.header_values: list[str] = []
        """Every request header value seen."""
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="expiring-storage", daemon=True
        )

    @property
    def endpoint(self) -> str:
        """The proxy's URL (give it to the Butler server as ``S3_ENDPOINT_URL``)."""
        return f"http://127.0.0.1:{self.port}"

    def signatures(self) -> int:
        """Return how many distinct signed URLs were used."""
        with self._lock:
            return len(self._first_seen)

    def reset(self, lifetime: float | None = None) -> None:
        """Forget what was seen; refuse URLs older than ``lifetime`` from now on."""
        with self._lock:
            self.lifetime = lifetime
            self._first_seen.clear()
            self.requests = self.refused = 0
            self.header_names.clear()
            self.header_values.clear()

    def start(self) -> ExpiringStorage:
        """Serve in a thread of this process."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()

    def _expired(self, path: str, headers: Mapping[str, str]) -> bool:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(path).query))
        signature = query.get("Signature") or query.get("X-Amz-Signature")
        now = time.monotonic()
        with self._lock:
            self.requests += 1
            self.header_names.update(name.lower() for name in headers)
            self.header_values.extend(headers.values())
            if signature is None:
                return False
            first = self._first_seen.setdefault(signature, now)
            if self.lifetime is not None and now - first > self.lifetime:
                self.refused += 1
                return True
        return False

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        storage = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 -- the base's name
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._forward()

            def _forward(self) -> None:
                if storage._expired(self.path, dict(self.headers.items())):
                    body = b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", storage.target_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                    upstream.request(self.command, self.path, headers=headers)
                    answer = upstream.getresponse()
                    body = answer.read()
                    self.send_response(answer.status)
                    for name, value in answer.getheaders():
                        if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                finally:
                    upstream.close()

        return Handler
