"""Remote I/O: the one module that talks to an object store (boto3).

Endpoint and credentials are resolved the way lsst-resources resolves them
(``S3_ENDPOINT_URL``, ``AWS_*`` variables and files, ``s3://profile@bucket/`` with
``LSST_RESOURCES_S3_PROFILE_profile``). The client itself is our own: lsst-resources'
client retries for minutes (ten adaptive attempts, a 180 s read timeout), while a
filesystem read must fail with ``EIO`` within a bounded, configurable time and work
again when the endpoint returns.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import TypeVar

import boto3
import botocore.config
import botocore.exceptions
from lsst.resources.s3utils import _get_s3_connection_parameters

from .errors import FsError, UsageError

__all__ = ["ObjectStore", "RetryPolicy", "is_remote", "split_s3_uri"]

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

        data = self._with_retries(f"{uri} [{start}, {end})", get)
        with self._lock:
            self.requests += 1
            self.bytes_fetched += len(data)
        return data

    def size(self, uri: str) -> int:
        """Return an object's size (a HEAD: only for artifacts whose record lacks it)."""
        profile, bucket, key = split_s3_uri(uri)
        client = self._client(profile)
        head = self._with_retries(uri, lambda: client.head_object(Bucket=bucket, Key=key))
        return int(head["ContentLength"])

    def _with_retries(self, what: str, call: Callable[[], _T]) -> _T:
        policy = self.policy
        first = time.monotonic()
        pause = policy.backoff
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except botocore.exceptions.ClientError as err:
                code = err.response.get("Error", {}).get("Code", "")
                status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                if status < 500 and code not in ("SlowDown", "RequestTimeout", "Throttling"):
                    raise FsError(errno.EIO, f"{what}: {code or status}") from None
                reason = f"{code or status}"
            except (*_RETRYABLE, _ShortReadError) as err:
                reason = str(err) if isinstance(err, _ShortReadError) else type(err).__name__
            if time.monotonic() - first + pause > policy.deadline:
                _LOG.warning("Giving up on %s after %d attempts: %s", what, attempt, reason)
                raise FsError(errno.EIO, f"{what}: {reason} after {attempt} attempts")
            _LOG.info("Retrying %s in %.1f s: %s", what, pause, reason)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)

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
