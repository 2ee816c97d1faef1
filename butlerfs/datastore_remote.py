"""The datastore of a client/server Butler (``RemoteButler``), as a Butler server serves it.

Records come in bulk from the server's file-transfer endpoint (``POST .../v1/file_transfer``,
at most 10,000 dataset IDs per request): path (with ``#zip-path=`` for a zip member), size,
checksum and component of every file, without signing anything. An artifact's URI is the
server's permanent download URL of the dataset (``.../v1/dataset/<uuid>/download``, plus
``?component=`` for a component of a disassembled composite, plus the record's ``#zip-path=``
fragment): stable, so it names the artifact in ``user.butler.uri``, the block cache and
``butlerfs run``'s ``uri`` staging, and it answers with a redirect to a freshly signed URL,
which `butlerfs.http_store.HttpStore` asks for when it reads.

The file-transfer endpoint and the connection object are private to daf_butler: this module
is written against lsst-daf-butler 30.2026.4300 (``tests/test_remote.py`` exercises it on a
real server). Only the Butler server ever receives the user's token.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import logging
import urllib.parse
import uuid
from collections.abc import Callable, Sequence

from lsst.daf.butler import ButlerUserError
from lsst.daf.butler.remote_butler import ButlerServerError, RemoteButler
from lsst.daf.butler.remote_butler.server_models import GetFileTransferInfoRequestModel

from .datastore import Artifact, Datastore, ServerAuth
from .errors import FsError, UsageError

__all__ = ["RemoteDatastore"]

_LOG = logging.getLogger(__name__)

MAX_IDS = GetFileTransferInfoRequestModel.MAX_ITEMS_PER_REQUEST
"""Most dataset IDs per file-transfer request (10,000)."""
_PARALLEL = 4
"""File-transfer requests of one listing in flight at once."""
_MIN_CHUNK = 1000
"""Fewest IDs per request when a listing is split."""


class RemoteDatastore(Datastore):
    """The artifacts of a ``RemoteButler``'s repository.

    Parameters
    ----------
    butler : `lsst.daf.butler.remote_butler.RemoteButler`
        The client.
    """

    serves_paths = False

    def __init__(self, butler: RemoteButler) -> None:
        self._connection = butler._connection
        self.server_url = self._connection.server_url.rstrip("/")
        self.description = f"the Butler server {self.server_url}"
        self._download = self.server_url + "/v1/dataset/"

    def roots(self) -> list[str]:
        """Return the server's repository URL: every artifact is read through it."""
        return [self.server_url + "/"]

    def server_auth(self) -> ServerAuth:
        """Return the server's URL and the headers carrying the user's token."""
        return ServerAuth(self.server_url + "/", self._connection.auth.get_server_headers())

    def download_uri(self, dataset_id: uuid.UUID, component: str | None, path: str) -> str:
        """Return the permanent download URL of one file of a dataset."""
        uri = f"{self._download}{dataset_id}/download"
        if component:
            uri += "?component=" + urllib.parse.quote(component, safe="")
        _, hash_sign, fragment = path.partition("#")
        return uri + hash_sign + fragment

    def artifact(
        self,
        dataset_id: uuid.UUID,
        store: int,
        path: str,
        size: int,
        component: str | None,
        checksum: str | None,
    ) -> Artifact:
        """Make an artifact again: its URI is the dataset's download URL."""
        uri = self.download_uri(dataset_id, component, path)
        return Artifact(path, size, component, checksum, "", uri=uri)

    def artifacts(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[Artifact, ...]]:
        """Return the artifacts of datasets, in requests of at most 10,000 IDs.

        A large listing is split into a few requests sent together: the server builds each
        answer on one of its threads, so they overlap.
        """
        ids = list(ids)
        size = min(MAX_IDS, max(_MIN_CHUNK, -(-len(ids) // _PARALLEL)))
        chunks = [ids[start : start + size] for start in range(0, len(ids), size)]
        found: dict[uuid.UUID, tuple[Artifact, ...]] = {}
        if len(chunks) <= 1:
            for chunk in chunks:
                found.update(self._records(chunk))
            return found
        with concurrent.futures.ThreadPoolExecutor(min(_PARALLEL, len(chunks))) as pool:
            for part in pool.map(self._records, chunks):
                found.update(part)
        return found

    def _records(self, ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[Artifact, ...]]:
        """One file-transfer request."""
        request = GetFileTransferInfoRequestModel.model_construct(dataset_ids=ids)
        response = self._connection.post("file_transfer", request)
        # Plain JSON: validating 10,000 records with pydantic would cost most of a listing.
        found = {}
        for key, records in json.loads(response.content)["files"].items():
            dataset_id = uuid.UUID(key)
            artifacts = [self._artifact(dataset_id, record) for record in records]
            found[dataset_id] = tuple(sorted(artifacts, key=lambda a: a.component or ""))
        return found

    def _artifact(self, dataset_id: uuid.UUID, record: dict) -> Artifact:
        if record.get("auth") != "gafaelfawr":
            # A server with authentication "cadc" hands out the datastore's own URLs, to be read
            # with the user's credentials; butlerfs knows only the signing servers of the RSP.
            raise FsError(
                errno.EIO,
                f"{self.description} serves artifacts with authentication {record.get('auth')!r}; "
                "butlerfs reads only from servers that sign URLs (authentication rubin_science_platform)",
            )
        info = record["file_info"]
        path = str(info["path"])
        component = info.get("component") or None
        size = info.get("file_size")
        return Artifact(
            path=path,
            size=int(size) if size is not None and int(size) >= 0 else -1,
            component=component,
            checksum=info.get("checksum"),
            formatter=str(info.get("formatter") or ""),
            uri=self.download_uri(dataset_id, component, path),
        )

    def unavailable(self, err: Exception) -> str | None:
        """Return why a query failed if the server did not answer (or answered 5xx), else `None`."""
        if not isinstance(err, ButlerServerError):
            return None
        if err.status_code is None:
            cause = err.__cause__
            return f"the Butler server does not answer ({type(cause).__name__ if cause else 'no answer'})"
        if err.status_code >= 500 or err.status_code == 429:
            return f"the Butler server answers HTTP {err.status_code}"
        return None

    def check(self, sample: Callable[[], Sequence[uuid.UUID]]) -> None:
        """Check that the server hands out artifacts: ask it to sign the URL of one dataset.

        Raises
        ------
        UsageError
            When it cannot (a POSIX datastore behind the server, a server error) or uses an
            authentication butlerfs cannot read with.
        """
        ids = list(sample())[:1]
        if not ids:
            return
        try:
            self._connection.get(f"get_file/{ids[0]}")
            self.artifacts(ids)
        except ButlerServerError as err:
            status = f"HTTP {err.status_code}" if err.status_code else "no answer"
            raise UsageError(
                f"{self.description} cannot hand out artifacts ({status} when asked to sign a URL for "
                f"dataset {ids[0]}): a Butler server serves artifacts only from an S3 or HTTP datastore, "
                "not a POSIX one; ask its administrator"
            ) from None
        except ButlerUserError as err:
            raise UsageError(f"{self.description} refused to hand out dataset {ids[0]}: {err}") from None
        except FsError as err:
            raise UsageError(err.strerror) from None
