"""Remote I/O over HTTP: reads of a Butler server's artifacts through the URLs it signs.

The one module that talks HTTP (with httpx2, the client daf_butler's ``RemoteButler`` uses).
`HttpStore` has the interface of `butlerfs.remote.ObjectStore` (``get_range``, ``size`` and
the ``requests``/``bytes_fetched`` counters) so the same `~butlerfs.fetch.Fetcher` reads
through it, and the same `~butlerfs.remote.RetryPolicy` bounds its faults.

An artifact is named by its permanent download URL on the Butler server
(``.../v1/dataset/<uuid>/download``). To read it, the store asks that URL (with the user's
token, on a client of its own that talks only to the server) for its redirect, a URL signed
for the storage host, and reads byte ranges from that URL on another client that never
carries the token. Signed URLs expire (the server signs for an hour): one is used until 80%
of the lifetime it states (or ``url_lifetime``), then one reader asks for a fresh one while
the others go on with the old; a URL the storage host refuses (HTTP 400, 401, 403: expired,
clock skew) is replaced at once. Asking for a URL is single-flight per artifact.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import logging
import threading
import time
import urllib.parse
from collections.abc import Iterator

import httpx2

from .datastore import ServerAuth
from .errors import FsError
from .remote import Attempts, RetryPolicy, classify

__all__ = ["HttpStore", "is_http"]


_LOG = logging.getLogger(__name__)

_REFRESH_FRACTION = 0.8
"""Part of a signed URL's stated lifetime after which a fresh one is asked for."""
_DEFAULT_LIFETIME = 3600.0
"""Lifetime assumed for a URL that does not state one (the Butler server signs for an hour)."""
_MAX_URLS = 100_000
"""Signed URLs remembered (least recently used dropped first)."""
_REFUSED = (400, 401, 403)
"""What S3 (and GCS) answer for an expired or otherwise unusable signed URL."""
_MAX_REFUSALS = 3
"""Refused URLs one read replaces before it fails (the replacements are fresh)."""
_REDIRECTS = (301, 302, 303, 307, 308)


def is_http(uri: str) -> bool:
    """Whether ``uri`` is read by this module."""
    return uri.startswith(("https://", "http://"))


class _TransientError(Exception):
    """Worth another attempt: a 5xx, a throttle, a connection that broke, a short read."""


class _RefusedError(Exception):
    """The storage host refused a signed URL."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@dataclasses.dataclass(frozen=True)
class _Signed:
    url: str
    refresh_at: float
    """Monotonic time after which a fresh URL is asked for."""
    expires_at: float
    """Monotonic time after which this URL is not used at all."""


class HttpStore:
    """Ranged GETs of artifacts served by a Butler server, with retries and counters.

    Parameters
    ----------
    policy : `~butlerfs.remote.RetryPolicy`, optional
        Timeouts and the retry deadline, as for S3.
    max_connections : `int`, optional
        Connection pool size (at least the fetch concurrency).
    auth : `~butlerfs.datastore.ServerAuth`, optional
        The Butler server's URL and the headers of requests to it. URLs under it are
        download URLs whose redirects are signed URLs; other http(s) URLs are read as
        they are, without any header.
    url_lifetime : `float`, optional
        Seconds a signed URL is used at most (by default 80% of the lifetime it states).
    """

    def __init__(
        self,
        policy: RetryPolicy | None = None,
        max_connections: int = 32,
        auth: ServerAuth | None = None,
        url_lifetime: float | None = None,
    ) -> None:
        self.policy = policy or RetryPolicy()
        self._auth = auth
        self._url_lifetime = url_lifetime
        timeout = httpx2.Timeout(
            connect=self.policy.connect_timeout,
            read=self.policy.read_timeout,
            write=self.policy.read_timeout,
            pool=self.policy.deadline,
        )
        limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        # Two clients: the server's carries the token; the storage host's never does (nor
        # any cookie the server might set).
        self._server = httpx2.Client(timeout=timeout, limits=limits, follow_redirects=False)
        self._storage = httpx2.Client(
            timeout=timeout,
            limits=limits,
            follow_redirects=False,
            headers={"Accept-Encoding": "identity"},
        )
        self._lock = threading.Lock()
        self._urls: collections.OrderedDict[str, _Signed] = collections.OrderedDict()
        self._signing: dict[str, concurrent.futures.Future[_Signed]] = {}
        self.requests = 0
        """HTTP requests made: to the server for signed URLs, and to the storage host."""
        self.bytes_fetched = 0
        self.urls_signed = 0
        """Signed URLs obtained from the server."""
        self.urls_refused = 0
        """Signed URLs the storage host refused (and that were replaced)."""

    # Signed URLs

    def _signed(self, base: str) -> _Signed:
        """Return a usable URL for ``base``: cached, or asked for (once for concurrent readers)."""
        now = time.monotonic()
        with self._lock:
            entry = self._urls.get(base)
            if entry is not None and now < entry.refresh_at:
                self._urls.move_to_end(base)
                return entry
            future = self._signing.get(base)
            if future is not None and entry is not None and now < entry.expires_at:
                return entry  # being refreshed by another reader: the old one still works
            mine = future is None
            if future is None:
                future = self._signing[base] = concurrent.futures.Future()
        if not mine:
            return future.result()  # the other reader's URL, or its error
        try:
            entry = self._sign(base)
        except BaseException as err:
            with self._lock:
                del self._signing[base]
            future.set_exception(err)
            raise
        with self._lock:
            self._urls[base] = entry
            self._urls.move_to_end(base)
            while len(self._urls) > _MAX_URLS:
                self._urls.popitem(last=False)
            del self._signing[base]
        future.set_result(entry)
        return entry

    def _refused(self, base: str, entry: _Signed, err: Exception, refused: int) -> int:
        """Drop a URL the storage host refused; return the refusals so far, or raise ``EIO`` at the limit."""
        self._forget(base, entry)
        refused += 1
        if refused >= _MAX_REFUSALS:  # fresh URLs refused too: retrying cannot help
            raise FsError(errno.EIO, f"{base}: the storage host refuses its signed URLs ({err})") from None
        _LOG.info("Signed URL of %s refused (%s): asking for a fresh one", base, err)
        return refused

    def _forget(self, base: str, entry: _Signed) -> None:
        """Drop a refused URL (unless another reader has replaced it already)."""
        with self._lock:
            if self._urls.get(base) is entry:
                del self._urls[base]
            self.urls_refused += 1

    def _sign(self, base: str) -> _Signed:
        """Ask the Butler server for a signed URL of a download URL."""
        now = time.monotonic()
        if self._auth is None or not self._auth.covers(base):
            return _Signed(base, float("inf"), float("inf"))
        with self._lock:
            self.requests += 1
        try:
            response = self._server.get(base, headers=self._auth.headers)
        except httpx2.TransportError as err:
            raise _TransientError(f"Butler server: {type(err).__name__}") from None
        status = response.status_code
        if status in _REDIRECTS:
            location = urllib.parse.urljoin(base, response.headers.get("location", ""))
            location = location.partition("#")[0]
            if not is_http(location):
                raise FsError(errno.EIO, f"{base}: the Butler server redirected to {location[:100]!r}")
            with self._lock:
                self.urls_signed += 1
            lifetime = _stated_lifetime(location)
            refresh = _REFRESH_FRACTION * lifetime
            if self._url_lifetime is not None:
                refresh = min(refresh, self._url_lifetime)
            return _Signed(location, now + refresh, now + lifetime)
        detail = response.text[:200].strip()
        if status >= 500 or status == 429:
            raise _TransientError(f"Butler server: HTTP {status}")
        if status in (401, 403):
            raise FsError(
                errno.EIO,
                f"{base}: the Butler server refused the token (HTTP {status}): "
                "check BUTLER_RUBIN_ACCESS_TOKEN",
            )
        raise FsError(errno.EIO, f"{base}: the Butler server answered HTTP {status} {detail}")

    # Reads

    def get_range(self, uri: str, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)`` of an artifact.

        Raises
        ------
        FsError
            ``EIO`` once the retry deadline has passed, or at once for a missing
            artifact, a refused token, or a storage host that refuses fresh URLs.
        """
        data, _ = self._read(uri, start, end)
        with self._lock:
            self.bytes_fetched += len(data)
        return data

    def iter_range(self, uri: str, start: int, end: int, chunk: int) -> Iterator[bytes]:
        """Yield bytes ``[start, end)`` of an artifact in pieces of ``chunk`` bytes as they arrive.

        One GET streams the range, as `remote.ObjectStore.iter_range` does: a broken
        stream resumes where it stopped (with a fresh URL if the host refuses the one it
        had), with the retry policy's back-off and a deadline counted from the last bytes
        received. Closing the iterator early closes the connection.

        Raises
        ------
        FsError
            As `get_range`.
        """
        base = uri.partition("#")[0]
        attempts = Attempts(self.policy, f"{base} [{start}, {end})")
        refused = 0
        pos = start
        while pos < end:
            entry = None
            try:
                entry = self._signed(base)
                for data in self._stream(entry.url, pos, end, chunk):
                    pos += len(data)
                    with self._lock:
                        self.bytes_fetched += len(data)
                    attempts.progress()
                    yield data
            except _RefusedError as err:
                assert entry is not None
                refused = self._refused(base, entry, err, refused)
            except Exception as err:  # noqa: BLE001 -- classified just below
                attempts.failed(classify(attempts.what, err, _retryable))

    def _stream(self, url: str, start: int, end: int, chunk: int) -> Iterator[bytes]:
        """One ranged GET from the storage host, yielded in pieces of ``chunk`` bytes (the last shorter)."""
        with self._lock:
            self.requests += 1
        pos = start
        try:
            with self._storage.stream("GET", url, headers={"Range": f"bytes={start}-{end - 1}"}) as response:
                _check_status(response.status_code, start)
                buffer = bytearray()
                for piece in response.iter_raw():
                    buffer += piece
                    while len(buffer) >= min(chunk, end - pos):
                        size = min(chunk, end - pos)
                        data = bytes(buffer[:size])
                        del buffer[:size]
                        pos += size
                        yield data
                        if pos >= end:  # never more than asked for, whatever the host sends
                            return
        except httpx2.TransportError as err:
            raise _TransientError(type(err).__name__) from None
        raise _TransientError(f"short read ({pos - start} of {end - start} bytes)")

    def size(self, uri: str) -> int:
        """Return an artifact's size (one 1-byte GET: real S3 refuses HEAD on GET-signed URLs)."""
        _, total = self._read(uri, 0, 1)
        if total is None:
            raise FsError(errno.EIO, f"{uri}: the storage host does not say the size (no Content-Range)")
        return total

    def _read(self, uri: str, start: int, end: int) -> tuple[bytes, int | None]:
        base = uri.partition("#")[0]
        refused = 0

        def attempt() -> tuple[bytes, int | None]:
            nonlocal refused
            while True:
                entry = self._signed(base)
                try:
                    return self._get(entry.url, start, end)
                except _RefusedError as err:
                    refused = self._refused(base, entry, err, refused)

        return self.policy.run(f"{base} [{start}, {end})", attempt, _retryable)

    def _get(self, url: str, start: int, end: int) -> tuple[bytes, int | None]:
        """One ranged GET from the storage host; return the bytes and the object's size if stated."""
        want = end - start
        with self._lock:
            self.requests += 1
        try:
            with self._storage.stream("GET", url, headers={"Range": f"bytes={start}-{end - 1}"}) as response:
                _check_status(response.status_code, start)
                total = _total_size(response.headers.get("content-range"))
                data = bytearray()
                for chunk in response.iter_raw():
                    data += chunk
                    if len(data) >= want:  # never more than asked for, whatever the host sends
                        break
        except httpx2.TransportError as err:
            raise _TransientError(type(err).__name__) from None
        if len(data) < want:
            raise _TransientError(f"short read ({len(data)} of {want} bytes)")
        return bytes(data[:want]), total

    def close(self) -> None:
        """Close both connection pools."""
        self._server.close()
        self._storage.close()


def _check_status(status: int, start: int) -> None:
    """Raise for a storage host's answer that is not the range asked for."""
    if status in _REFUSED:
        raise _RefusedError(status)
    if status >= 500 or status == 429:
        raise _TransientError(f"HTTP {status}")
    if not (status == 206 or (status == 200 and start == 0)):
        raise FsError(errno.EIO, f"unexpected HTTP {status} from the storage host")


def _retryable(err: Exception) -> str | None:
    """Why a failed attempt is worth retrying (`RetryPolicy.run`); `None` for a fatal error."""
    if isinstance(err, (_TransientError, ConnectionError, TimeoutError)):
        return str(err) or type(err).__name__
    return None


def _stated_lifetime(url: str) -> float:
    """Seconds a signed URL says it stays valid (SigV4, GCS, or SigV2's absolute ``Expires``)."""
    query = {k.lower(): v for k, v in urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)}
    try:
        for key in ("x-amz-expires", "x-goog-expires"):
            if key in query:
                return max(0.0, float(query[key]))
        if "expires" in query:
            return max(0.0, float(query["expires"]) - time.time())
    except ValueError:
        pass
    return _DEFAULT_LIFETIME


def _total_size(content_range: str | None) -> int | None:
    """The object size of a ``Content-Range: bytes 0-0/1234`` header."""
    if not content_range or "/" not in content_range:
        return None
    total = content_range.rsplit("/", 1)[1].strip()
    return int(total) if total.isdigit() else None
