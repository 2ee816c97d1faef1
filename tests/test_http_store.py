"""`HttpStore` streaming against a real HTTP server on 127.0.0.1 that misbehaves on purpose."""

from __future__ import annotations

import errno
import http.server
import os
import re
import threading
from collections.abc import Iterator

import pytest

from butlerfs.errors import FsError
from butlerfs.http_store import HttpStore
from butlerfs.remote import RetryPolicy

DATA = os.urandom(5 * 65536 + 1234)
CHUNK = 65536


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves DATA by range; ``mode`` says how to misbehave, ``requests`` counts GETs."""

    mode = "ok"
    requests: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 -- http.server's name
        type(self).requests.append(self.headers["Range"])
        if self.mode == "refuse":
            self.send_error(403)
            return
        start, end = (int(v) for v in re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers["Range"]).groups())
        body = DATA[start : end + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(DATA)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.mode == "break" and len(type(self).requests) == 1:
            # The first answer stops a little after its second chunk, mid-block.
            self.wfile.write(body[: 2 * CHUNK + 999])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"requests": [], "mode": "ok"})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/object.fits", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def _store() -> HttpStore:
    return HttpStore(RetryPolicy(connect_timeout=2, read_timeout=2, deadline=5, backoff=0.05))


def test_iter_range_streams_exact_chunks(server):
    url, handler = server
    store = _store()
    try:
        pieces = list(store.iter_range(url, 1000, len(DATA), CHUNK))
    finally:
        store.close()
    assert [len(p) for p in pieces[:-1]] == [CHUNK] * (len(pieces) - 1)
    assert b"".join(pieces) == DATA[1000:]
    assert handler.requests == [f"bytes=1000-{len(DATA) - 1}"]
    assert store.requests == 1 and store.bytes_fetched == len(DATA) - 1000


def test_a_broken_stream_resumes_where_it_stopped(server):
    url, handler = server
    handler.mode = "break"
    store = _store()
    try:
        pieces = list(store.iter_range(url, 0, len(DATA), CHUNK))
    finally:
        store.close()
    assert b"".join(pieces) == DATA
    assert [len(p) for p in pieces[:-1]] == [CHUNK] * (len(pieces) - 1)
    # The second GET starts at the first byte not yet handed over (whole chunks only).
    assert handler.requests == [f"bytes=0-{len(DATA) - 1}", f"bytes={2 * CHUNK}-{len(DATA) - 1}"]


def test_a_host_that_refuses_every_url_gives_eio(server):
    url, handler = server
    handler.mode = "refuse"
    store = _store()
    try:
        with pytest.raises(FsError) as caught:
            list(store.iter_range(url, 0, len(DATA), CHUNK))
    finally:
        store.close()
    assert caught.value.errno == errno.EIO
    assert "refuses its signed URLs" in str(caught.value)
    assert len(handler.requests) == 3
