"""Where a dataset's files are: the one seam between direct and client/server Butlers.

Everything butlerfs asks of the *registry* (dataset types, counts, data IDs, which datasets)
goes through the Butler's public query API and works the same on a direct Butler and on a
client/server one (``RemoteButler``). What differs is the datastore: a direct Butler's
records are read in bulk from its database and its artifacts have ``file://`` or ``s3://``
URIs; a Butler server hands out the records in bulk too, but its artifacts are read through
URLs it signs on request. `Datastore` is that difference, with one implementation each in
`butlerfs.datastore_direct` and `butlerfs.datastore_remote`; `datastore_for` picks one. No
other module learns which kind of Butler it talks to.

This module imports nothing from the LSST stack, so the source layer can use `Artifact`
without it.
"""

from __future__ import annotations

import abc
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["Artifact", "Datastore", "ServerAuth", "datastore_for"]


class Artifact:
    """One file of a dataset as the datastore records it.

    The URI may be resolved from the record's path only when first asked for (opening
    the file, reading its xattr): resolving 100,000 of them up front would cost seconds
    of a listing.

    Parameters
    ----------
    path : `str`
        Path as recorded: relative to the datastore root, or an absolute URI; with a
        ``#zip-path=`` fragment for a zip member.
    size : `int`
        Size in bytes from the record; -1 if the record has none.
    component : `str` or `None`
        Component name for a disassembled composite.
    checksum : `str` or `None`
        Checksum from the record.
    formatter : `str`
        Formatter from the record.
    resolve : callable, optional
        Returns the URI of ``path``; called once, when `uri` is first read.
    uri : `str`, optional
        The URI, when known already.
    store : `int`, optional
        Which of the datastore's roots ``resolve`` resolves against (-1: none); with the
        dataset ID, what `Datastore.artifact` needs to make the artifact again (an on-disk
        listing index keeps that, not the URI).
    """

    __slots__ = ("_resolve", "_uri", "checksum", "component", "formatter", "path", "size", "store")

    def __init__(
        self,
        path: str,
        size: int,
        component: str | None,
        checksum: str | None,
        formatter: str,
        resolve: Callable[[str], str] | None = None,
        uri: str | None = None,
        store: int = -1,
    ) -> None:
        self.path = path
        self.size = size
        self.component = component
        self.checksum = checksum
        self.formatter = formatter
        self._resolve = resolve
        self._uri = uri
        self.store = store

    @property
    def uri(self) -> str:
        """Full URI, with a ``#zip-path=`` fragment for zip members.

        A stable URI, never a signed URL: for a Butler server, its permanent download
        URL of the dataset.
        """
        if self._uri is None:
            assert self._resolve is not None, "an Artifact needs a URI or a way to resolve one"
            self._uri = self._resolve(self.path)
        return self._uri

    def __repr__(self) -> str:
        return f"Artifact({self.path!r}, size={self.size}, component={self.component!r})"


class ServerAuth:
    """How to ask a Butler server for signed URLs: its URL prefix and the headers it needs.

    The headers (the user's token) are sent only to URLs under ``prefix``, never to the
    host a signed URL points at.

    Parameters
    ----------
    prefix : `str`
        The server's repository URL (``https://host/api/butler/repo/NAME/``).
    headers : `~collections.abc.Mapping` [`str`, `str`]
        Authentication headers of requests to the server.
    """

    def __init__(self, prefix: str, headers: Mapping[str, str]) -> None:
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self.headers = dict(headers)

    def covers(self, url: str) -> bool:
        """Whether ``url`` is on the server (and may carry the headers)."""
        return url.startswith(self.prefix)

    def __repr__(self) -> str:  # never show the token
        return f"ServerAuth({self.prefix!r}, headers={sorted(self.headers)})"


class Datastore(abc.ABC):
    """The records and artifact URIs of one Butler's datastore."""

    description: str = "the datastore"
    """How messages name it (``the Butler server https://...``)."""

    serves_paths: bool = True
    """Whether artifacts may be files at rest that a program can open by path."""

    reads_ingest_dates: bool = False
    """Whether `artifacts_and_ingest_dates` reads the datasets' ingest dates with their records."""

    @abc.abstractmethod
    def artifacts(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[Artifact, ...]]:
        """Return the artifacts of datasets in bulk, sorted by component.

        A dataset without records is absent from the result.
        """

    def artifacts_and_ingest_dates(
        self, ids: Sequence[uuid.UUID]
    ) -> tuple[dict[uuid.UUID, tuple[Artifact, ...]], dict[uuid.UUID, Any]]:
        """Return `artifacts` and each dataset's ingest date as the registry stores it.

        Only if `reads_ingest_dates`. A date is an integer (nanoseconds TAI since 1970)
        or, in registries whose datasets manager has schema 1.x, a naive datetime in UTC.
        """
        raise NotImplementedError(f"{type(self).__name__} reads no ingest dates")

    def artifacts_selected(self, selection: Any) -> dict[uuid.UUID, tuple[Artifact, ...]]:
        """Return the artifacts of the datasets whose IDs ``selection``, a query of the registry, selects.

        Only a direct Butler's datastore, whose records are in the registry's database.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot join a registry query")

    @abc.abstractmethod
    def artifact(
        self,
        dataset_id: uuid.UUID,
        store: int,
        path: str,
        size: int,
        component: str | None,
        checksum: str | None,
    ) -> Artifact:
        """Make an artifact of `artifacts` again from what identifies it (no request).

        Parameters
        ----------
        dataset_id : `uuid.UUID`
            Its dataset.
        store : `int`
            Its `Artifact.store`.
        path, size, component, checksum
            Its record's fields (the formatter is not kept).
        """

    @abc.abstractmethod
    def roots(self) -> list[str]:
        """Return where artifacts come from: each file datastore's root, or the server's URL."""

    def server_auth(self) -> ServerAuth | None:
        """Return how to obtain signed URLs from a Butler server (`None` for a direct Butler)."""
        return None

    def unavailable(self, err: Exception) -> str | None:
        """Return why a query failed if the Butler cannot be reached now, else `None`.

        A direct Butler's database errors are recognised by the registry module itself.
        """
        return None

    def check(self, sample: Callable[[], Sequence[uuid.UUID]]) -> None:  # noqa: B027 -- a hook
        """Check that artifacts can be read; nothing to do for a direct Butler.

        Parameters
        ----------
        sample : callable
            Returns a few dataset IDs to try (called only if needed).

        Raises
        ------
        UsageError
            Saying why the artifacts cannot be read and what to do.
        """

    def primary_artifacts(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Artifact | None]:
        """Return the one artifact of each dataset: `None` for a disassembled composite.

        Datasets without an artifact are absent from the result.
        """
        result: dict[uuid.UUID, Artifact | None] = {}
        for dataset_id, found in self.artifacts(ids).items():
            result[dataset_id] = found[0] if len(found) == 1 and found[0].component is None else None
        return result


def datastore_for(butler: Any) -> Datastore:
    """Return the `Datastore` of a Butler, direct or client/server."""
    from . import datastore_direct

    if datastore_direct.serves(butler):
        return datastore_direct.DirectDatastore(butler)
    from . import datastore_remote

    return datastore_remote.RemoteDatastore(butler)
