"""A storage-class-free file-artifact formatter for daf_butler.

daf_butler ships no generic "just a file" formatter: ingest imports the formatter and checks the file's
extension against it, and ``put`` serializes an in-memory Python object.  butlerfs stores files written
by external programs, so it brings its own pair:

* the storage class ``ButlerfsFile`` whose Python type is `lsst.resources.ResourcePath`, and
* `FileArtifactFormatter`, which "reads" by returning the artifact's URI (no bytes are read) and
  "writes" by copying the file a `~lsst.resources.ResourcePath` points to into the datastore.

Storage classes are not stored in the registry, so every process that opens the repository needs the
same configuration: `storage_class_config` gives the snippet to merge into a repository's ``butler.yaml``
(or a file on ``DAF_BUTLER_CONFIG_PATH``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar

from lsst.daf.butler import FormatterV2, Location
from lsst.daf.butler.datastore.cache_manager import AbstractDatastoreCacheManager
from lsst.resources import ResourcePath, ResourcePathExpression

__all__ = [
    "STORAGE_CLASS_NAME",
    "FileArtifactFormatter",
    "put_source_extension",
    "storage_class_config",
    "write_config_dir",
]

STORAGE_CLASS_NAME = "ButlerfsFile"
"""Name of the storage class whose artifacts `FileArtifactFormatter` handles."""

# The datastore decides the artifact's path (extension included) in ``put`` *before* it hands the
# object to the formatter, through ``formatter.get_write_extension()``, which sees only the ref and
# the config.  `put_source_extension` passes the source's extension through this context variable.
_SOURCE_EXTENSION: ContextVar[str | None] = ContextVar("butlerfs_put_source_extension", default=None)


@contextlib.contextmanager
def put_source_extension(source: ResourcePathExpression) -> Iterator[ResourcePath]:
    """Name the artifacts of ``put`` calls in this block with ``source``'s extension.

    Parameters
    ----------
    source : `lsst.resources.ResourcePathExpression`
        The file about to be ``put``.

    Yields
    ------
    uri : `lsst.resources.ResourcePath`
        ``source`` as a `~lsst.resources.ResourcePath`, ready to pass to ``put``.

    Notes
    -----
    Without this, a ``put`` artifact takes the extension from the formatter's ``extension`` write
    parameter (config ``parameters: {extension: .fits}``), else it has none.  Ingest always keeps
    the source file's extension.
    """
    uri = ResourcePath(source, forceDirectory=False)
    token = _SOURCE_EXTENSION.set(uri.getExtension())
    try:
        yield uri
    finally:
        _SOURCE_EXTENSION.reset(token)


class FileArtifactFormatter(FormatterV2):
    """Formatter whose in-memory dataset is the artifact's `~lsst.resources.ResourcePath`.

    Notes
    -----
    Reading returns the URI of the stored artifact (for an artifact inside a Zip file ingested with
    ``butler ingest-zip``, the URI with its ``#zip-path=`` fragment) and reads no bytes.  Writing
    copies the file the given `~lsst.resources.ResourcePath` (or path string) points to.  Every file
    extension is accepted on ingest.
    """

    supported_write_parameters: ClassVar[frozenset[str]] = frozenset({"extension"})
    default_extension: ClassVar[str | None] = None
    can_read_from_uri: ClassVar[bool] = True

    def get_write_extension(self) -> str:
        """Return the extension of a ``put`` artifact, or of the artifact already written.

        Returns
        -------
        extension : `str`
            The extension of the source announced with `put_source_extension`, else the
            ``extension`` write parameter, else that of an artifact already at the predicted
            location, else ``""``.

        Notes
        -----
        The datastore also asks this when it predicts where an artifact is without a record:
        ``butler transfer-from-graph`` after a quantum-backed run, and a quantum-backed
        butler reading an output of an earlier quantum. Outside `put_source_extension`, the
        artifact written with the source's extension is found by listing its directory.
        """
        source = _SOURCE_EXTENSION.get()
        ext: str | None = source or self.write_parameters.get("extension")
        if ext is None:
            # Outside a put (source None): predicting where an artifact is; inside one of a
            # file without an extension (source ""): none.
            ext = self._extension_at_rest() if source is None else ""
        if ext and not ext.startswith("."):
            ext = "." + ext
        return ext

    def _extension_at_rest(self) -> str:
        """Return the extension of the artifact at the predicted location, ``""`` if none."""
        location = self.file_descriptor.location.clone()
        location.updateExtension("")
        stem_uri = location.uri
        stem = stem_uri.basename()
        try:
            _, _, names = next(iter(stem_uri.dirname().walk()))
        except (StopIteration, FileNotFoundError, NotADirectoryError):
            return ""
        found = sorted(name[len(stem) :] for name in names if name.startswith(stem + "."))
        return found[0] if found else ""

    @classmethod
    def validate_extension(cls, location: Location) -> None:
        """Accept any extension.

        Parameters
        ----------
        location : `lsst.daf.butler.Location`
            Location whose extension would be checked.
        """
        return None

    def can_accept(self, in_memory_dataset: Any) -> bool:
        """Accept `~lsst.resources.ResourcePath`, `str` and `os.PathLike` sources.

        Parameters
        ----------
        in_memory_dataset : `object`
            The object given to ``put``.

        Returns
        -------
        accepts : `bool`
            Whether the object names a file this formatter can copy.
        """
        return isinstance(in_memory_dataset, ResourcePath | str | os.PathLike)

    def read(
        self,
        component: str | None = None,
        expected_size: int = -1,
        cache_manager: AbstractDatastoreCacheManager | None = None,
    ) -> ResourcePath:
        """Return the artifact's URI without reading it.

        Parameters
        ----------
        component : `str`, optional
            Ignored: the storage class has no components.
        expected_size : `int`, optional
            Ignored.
        cache_manager : `AbstractDatastoreCacheManager`, optional
            Ignored: nothing is downloaded, so nothing is cached.

        Returns
        -------
        uri : `lsst.resources.ResourcePath`
            URI of the artifact in the datastore.
        """
        # Overridden rather than read_from_uri: the base class would download remote or zipped
        # artifacts into a cache or a temporary file first and hand us that short-lived copy.
        return self.file_descriptor.location.uri

    def read_from_uri(self, uri: ResourcePath, component: str | None = None, expected_size: int = -1) -> Any:
        """Return ``uri`` itself.

        Parameters
        ----------
        uri : `lsst.resources.ResourcePath`
            URI of the artifact.
        component : `str`, optional
            Ignored.
        expected_size : `int`, optional
            Ignored.

        Returns
        -------
        uri : `lsst.resources.ResourcePath`
            The given URI.
        """
        return uri

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        """Copy the source file to ``uri``.

        Parameters
        ----------
        in_memory_dataset : `lsst.resources.ResourcePath` or `str` or `os.PathLike`
            The file to store.
        uri : `lsst.resources.ResourcePath`
            Local (temporary) destination chosen by the datastore.
        """
        source = ResourcePath(in_memory_dataset, forceDirectory=False)
        uri.transfer_from(source, transfer="copy", overwrite=True)


def storage_class_config() -> dict[str, Any]:
    """Return the butler config snippet registering ``ButlerfsFile`` and its formatter.

    Returns
    -------
    config : `dict`
        ``storageClasses`` and ``datastore: formatters`` entries to merge into a repository's
        ``butler.yaml`` (e.g. as ``Butler.makeRepo(root, config=...)``).  Add ``parameters:
        {extension: .fits}`` per dataset type under ``datastore: formatters`` to give ``put``
        artifacts an extension.
    """
    return {
        "storageClasses": {STORAGE_CLASS_NAME: {"pytype": "lsst.resources.ResourcePath"}},
        "datastore": {"formatters": {STORAGE_CLASS_NAME: FileArtifactFormatter.name()}},
    }


def write_config_dir(directory: str | os.PathLike[str]) -> Path:
    """Write the `storage_class_config` snippet as a directory for ``DAF_BUTLER_CONFIG_PATH``.

    Parameters
    ----------
    directory : path-like
        Directory to create (or update) with ``storageClasses.yaml`` and ``datastore.yaml``.

    Returns
    -------
    directory : `pathlib.Path`
        The directory, absolute: put it on ``DAF_BUTLER_CONFIG_PATH`` (``:``-separated) of
        every process that opens a repository whose ``butler.yaml`` lacks ``ButlerfsFile``.
    """
    import yaml

    config = storage_class_config()
    path = Path(directory).absolute()
    path.mkdir(parents=True, exist_ok=True)
    (path / "storageClasses.yaml").write_text(yaml.safe_dump({"storageClasses": config["storageClasses"]}))
    (path / "datastore.yaml").write_text(yaml.safe_dump({"datastore": config["datastore"]}))
    return path
