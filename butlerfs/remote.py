"""Remote I/O: the one module that talks to an object store (boto3).

Endpoint and credentials are resolved the way lsst-resources resolves them
(``S3_ENDPOINT_URL``, ``AWS_*`` variables and files, ``s3://profile@bucket/`` with
``LSST_RESOURCES_S3_PROFILE_profile``). The client itself is our own: lsst-resources'
client retries for minutes (ten adaptive attempts, a 180 s read timeout), while a
filesystem read must fail with ``EIO`` within a bounded, configurable time and work
again when the endpoint returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import errno
import functools
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import TypeVar

import boto3
import botocore.config
import botocore.exceptions
from lsst.resources.s3utils import _get_s3_connection_parameters

from .errors import FsError, UsageError

__all__ = ["Attempts", "ObjectStore", "RetryPolicy", "abandon_when", "classify", "is_remote", "split_s3_uri"]

_T = TypeVar("_T")

_LOG = logging.getLogger(__name__)

_RETRYABLE = (
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    ConnectionError,
    TimeoutError,
)


class _ShortReadError(Exception):
    """The server sent fewer bytes than the range asked for."""


_ABANDON: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("abandon", default=None)


@contextlib.contextmanager
def abandon_when(predicate: Callable[[], bool]) -> Iterator[None]:
    """Within the block, a failed request of this thread is not retried once ``predicate()`` is true.

    The fetcher uses it for read-ahead nobody waits for: retrying it would hold a
    connection and a fetch thread that a reader may need.
    """
    token = _ABANDON.set(predicate)
    try:
        yield
    finally:
        _ABANDON.reset(token)


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names an object in an object store."""
    return uri.startswith("s3://")


def split_s3_uri(uri: str) -> tuple[str | None, str, str]:
    """Return ``(profile, bucket, key)`` of an ``s3://[profile@]bucket/key`` URI."""
    parsed = urllib.parse.urlsplit(uri.partition("#")[0])
    profile, _, bucket = parsed.netloc.rpartition("@")
    return (profile or None), bucket, urllib.parse.unquote(parsed.path.lstrip("/"))


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long a request may take before the read fails with ``EIO``."""

    connect_timeout: float = 3.0
    """Seconds to establish a connection."""
    read_timeout: float = 10.0
    """Seconds without bytes from the server before a request is abandoned."""
    deadline: float = 30.0
    """Seconds from the first attempt after which no retry is started."""
    backoff: float = 0.2
    """First pause between attempts; doubled each time, at most 5 s."""

    @classmethod
    def within(cls, timeout: float) -> RetryPolicy:
        """Return a policy whose failing requests give up after about ``timeout`` seconds.

        The deadline alone does not bound a stalled endpoint: an attempt waits for its
        connect and read timeouts whatever the deadline, so those are capped too.

        Parameters
        ----------
        timeout : `float`
            Seconds (``MountOptions.timeout``).
        """
        floor = 0.5  # a zero socket timeout would mean non-blocking, not "fail at once"
        return cls(
            connect_timeout=max(floor, min(cls.connect_timeout, timeout)),
            read_timeout=max(floor, min(cls.read_timeout, timeout)),
            deadline=timeout,
        )

    def run(self, what: str, call: Callable[[], _T], retryable: Callable[[Exception], str | None]) -> _T:
        """Call ``call`` until it succeeds, retrying the failures ``retryable`` names, within the deadline.

        Store-agnostic: any store (S3, HTTP) gives its own classification.

        Parameters
        ----------
        what : `str`
            What is being fetched, for messages.
        call : callable
            One attempt.
        retryable : callable
            Returns a reason for an exception worth retrying, else `None` (re-raised).

        Raises
        ------
        FsError
            ``EIO`` once no retry fits before the deadline, or the attempt was abandoned.
        """
        attempts = Attempts(self, what)
        while True:
            try:
                return call()
            except Exception as err:  # noqa: BLE001 -- classified just below
                attempts.failed(classify(what, err, retryable))


def classify(what: str, err: Exception, retryable: Callable[[Exception], str | None]) -> str:
    """The reason to retry after ``err``; re-raise it (or the classifier's `FsError`) otherwise."""
    try:
        reason = retryable(err)
    except FsError as fatal:
        raise FsError(fatal.errno or errno.EIO, f"{what}: {fatal.strerror}") from None
    if reason is None:
        raise err
    return reason


class Attempts:
    """The retry bookkeeping of one request: back-off, and the deadline since the last progress.

    Parameters
    ----------
    policy : `RetryPolicy`
        Back-off and deadline.
    what : `str`
        What is being fetched, for messages.
    """

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy = policy
        self.what = what
        self.count = 0
        self.progress()

    def progress(self) -> None:
        """Bytes arrived: the deadline counts from now, and the back-off starts over."""
        self._since = time.monotonic()
        self._pause = self.policy.backoff

    def failed(self, reason: str) -> None:
        """Sleep before the next attempt, or raise ``EIO`` if it would start past the deadline."""
        self.count += 1
        abandon = _ABANDON.get()
        if abandon is not None and abandon():
            raise FsError(errno.EIO, f"{self.what}: {reason} (abandoned: nobody waits for it)")
        if time.monotonic() - self._since + self._pause > self.policy.deadline:
            _LOG.warning("Giving up on %s after %d attempts: %s", self.what, self.count, reason)
            raise FsError(errno.EIO, f"{self.what}: {reason} after {self.count} attempts")
        _LOG.info("Retrying %s in %.1f s: %s", self.what, self._pause, reason)
        time.sleep(self._pause)
        self._pause = min(self._pause * 2, 5.0)


class ObjectStore:
    """Ranged GETs with retries, and counters of what was fetched.

    Parameters
    ----------
    policy : `RetryPolicy`, optional
        Timeouts and the retry deadline.
    max_connections : `int`, optional
        Connection pool size per endpoint (at least the fetch concurrency).
    """

    def __init__(self, policy: RetryPolicy | None = None, max_connections: int = 32) -> None:
        self.policy = policy or RetryPolicy()
        self._max_connections = max_connections
        self._lock = threading.Lock()
        self.requests = 0
        self.bytes_fetched = 0

    @functools.cache  # noqa: B019 -- one client per profile for the store's lifetime is the point
    def _client(self, profile: str | None):
        endpoint = _get_s3_connection_parameters(profile)
        config = botocore.config.Config(
            connect_timeout=self.policy.connect_timeout,
            read_timeout=self.policy.read_timeout,
            retries={"total_max_attempts": 1},
            max_pool_connections=self._max_connections,
        )
        session = boto3.Session(profile_name=endpoint.profile)
        return session.client(
            "s3",
            endpoint_url=endpoint.endpoint_url,
            aws_access_key_id=endpoint.access_key_id,
            aws_secret_access_key=endpoint.secret_access_key,
            config=config,
        )

    def get_range(self, uri: str, start: int, end: int) -> bytes:
        """Return bytes ``[start, end)`` of an object.

        Raises
        ------
        FsError
            ``EIO`` once the retry deadline has passed, or at once for a missing
            object or refused access (retrying cannot help).
        """
        profile, bucket, key = split_s3_uri(uri)
        client = self._client(profile)

        def get() -> bytes:
            response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")
            data: bytes = response["Body"].read()
            if len(data) != end - start:
                raise _ShortReadError(f"short read ({len(data)} of {end - start} bytes)")
            return data

        data = self.policy.run(f"{uri} [{start}, {end})", get, _retryable)
        with self._lock:
            self.requests += 1
            self.bytes_fetched += len(data)
        return data

    def iter_range(self, uri: str, start: int, end: int, chunk: int) -> Iterator[bytes]:
        """Yield bytes ``[start, end)`` of an object in pieces of ``chunk`` bytes as they arrive.

        One GET streams the range; a broken stream is resumed where it stopped, with the
        retry policy's back-off and a deadline counted from the last bytes received.
        Closing the iterator early closes the connection.

        Raises
        ------
        FsError
            As `get_range`.
        """
        profile, bucket, key = split_s3_uri(uri)
        client = self._client(profile)
        attempts = Attempts(self.policy, f"{uri} [{start}, {end})")
        pos = start
        while pos < end:
            body = None
            try:
                response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={pos}-{end - 1}")
                with self._lock:
                    self.requests += 1
                body = response["Body"]
                while pos < end:
                    want = min(chunk, end - pos)
                    data = body.read(want)
                    while 0 < len(data) < want:  # urllib3 may hand over less than asked
                        more = body.read(want - len(data))
                        if not more:
                            break
                        data += more
                    if len(data) != want:
                        got = pos - start + len(data)
                        raise _ShortReadError(f"short read ({got} of {end - start} bytes)")
                    with self._lock:
                        self.bytes_fetched += want
                    pos += want
                    attempts.progress()
                    yield data
            except Exception as err:  # noqa: BLE001 -- classified just below
                attempts.failed(classify(attempts.what, err, _retryable))
            finally:
                if body is not None:
                    body.close()

    def size(self, uri: str) -> int:
        """Return an object's size (a HEAD: only for artifacts whose record lacks it)."""
        profile, bucket, key = split_s3_uri(uri)
        client = self._client(profile)
        head = self.policy.run(uri, lambda: client.head_object(Bucket=bucket, Key=key), _retryable)
        return int(head["ContentLength"])

    def check_access(self, root: str) -> None:
        """Check at mount time that the datastore root's bucket can be read.

        Raises
        ------
        UsageError
            For an unknown bucket, bad credentials or an unreachable endpoint.
        """
        profile, bucket, prefix = split_s3_uri(root)
        client = self._client(profile)
        try:
            client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except botocore.exceptions.NoCredentialsError:
            raise UsageError(
                f"no S3 credentials for {root}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "or AWS_PROFILE"
            ) from None
        except botocore.exceptions.ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                raise UsageError(
                    f"bucket {bucket!r} of {root} does not exist at the S3 endpoint (check S3_ENDPOINT_URL)"
                ) from None
            raise UsageError(
                f"cannot read {root}: {code} (check the credentials in AWS_* or the profile)"
            ) from None
        except _RETRYABLE as err:
            raise UsageError(
                f"cannot reach the S3 endpoint for {root}: {err} (check S3_ENDPOINT_URL)"
            ) from None


def _retryable(err: Exception) -> str | None:
    """Why an S3 request that raised ``err`` is worth retrying; `None` if it is not.

    Raises
    ------
    FsError
        ``EIO`` at once for an S3 error that no retry can help (missing key, refused access).
    """
    if isinstance(err, botocore.exceptions.ClientError):
        code = err.response.get("Error", {}).get("Code", "")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status < 500 and code not in ("SlowDown", "RequestTimeout", "Throttling"):
            raise FsError(errno.EIO, f"{code or status}") from None
        return f"{code or status}"
    if isinstance(err, _ShortReadError):
        return str(err)
    if isinstance(err, _RETRYABLE):
        return type(err).__name__
    return None
