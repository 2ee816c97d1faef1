"""The datastore of a direct Butler: records read in bulk from its database.

Artifacts have ``file://`` or ``s3://`` URIs, resolved from the records' paths the way
`StoredFileInfo.file_location` does, only when first asked for.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from typing import Any

from lsst.daf.butler.datastore.stored_file_info import NULLSTR
from lsst.daf.butler.direct_butler import DirectButler
from lsst.resources import ResourcePath

from .datastore import Artifact, Datastore

__all__ = ["DirectDatastore", "serves"]


def serves(butler: Any) -> bool:
    """Whether ``butler`` is a direct Butler (its datastore in this process)."""
    return isinstance(butler, DirectButler)


class DirectDatastore(Datastore):
    """The file datastores of a direct Butler.

    Parameters
    ----------
    butler : `lsst.daf.butler.direct_butler.DirectButler`
        The Butler (used under its owner's lock: a Butler is not thread-safe).
    """

    description = "the datastore"
    serves_paths = True

    def __init__(self, butler: DirectButler) -> None:
        self._butler = butler
        datastore = butler._datastore
        chained = getattr(datastore, "datastores", [datastore])
        self._stores = [s for s in chained if hasattr(s, "locationFactory")]
        # One resolver per file datastore, shared by all its artifacts (a listing makes millions).
        self._resolvers = [functools.partial(_resolve, s.locationFactory) for s in self._stores]

    def roots(self) -> list[str]:
        """Return the root URI of each file datastore."""
        return [str(store.root) for store in self._stores]

    def artifacts(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[Artifact, ...]]:
        """Return the artifacts of datasets from the datastore's records, in bulk."""
        # The datastore's own export reads these rows too, but builds a
        # StoredFileInfo and a ResourcePath per row, which a listing does not need.
        found: dict[uuid.UUID, list[Artifact]] = {}
        for number, (store, resolve) in enumerate(zip(self._stores, self._resolvers, strict=True)):
            for batch in store._export_rows(list(ids)):
                for row in batch:
                    found.setdefault(row["dataset_id"], []).append(
                        Artifact(
                            path=row["path"],
                            size=int(row["file_size"]) if row["file_size"] is not None else -1,
                            component=None if row["component"] in (None, "", NULLSTR) else row["component"],
                            checksum=row["checksum"],
                            formatter=row["formatter"],
                            resolve=resolve,
                            store=number,
                        )
                    )
        return {k: tuple(sorted(v, key=lambda a: a.component or "")) for k, v in found.items()}

    def artifact(
        self,
        dataset_id: uuid.UUID,
        store: int,
        path: str,
        size: int,
        component: str | None,
        checksum: str | None,
    ) -> Artifact:
        """Make an artifact again: its path resolved against file datastore number ``store``."""
        if store < 0:
            return Artifact(path, size, component, checksum, "", uri=path)
        return Artifact(path, size, component, checksum, "", resolve=self._resolvers[store], store=store)


def _resolve(factory: Any, path: str) -> str:
    """Resolve a record's path as `StoredFileInfo.file_location` does."""
    as_uri = ResourcePath(path, forceAbsolute=False, forceDirectory=False)
    if as_uri.isabs():
        return str(as_uri)
    return str(factory.fromPath(path, trusted_path=True).uri)
