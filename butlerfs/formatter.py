"""A storage-class-free file-artifact formatter for daf_butler.

daf_butler ships no generic "just a file" formatter: ingest imports the formatter and checks the file's
extension against it, and ``put`` serializes an in-memory Python object.  butlerfs stores files written
by external programs, so it brings its own pair:

* the storage class ``ButlerfsFile`` whose Python type is `lsst.resources.ResourcePath`, and
* `FileArtifactFormatter`, which "reads" by returning the artifact's URI (no bytes are read) and
  "writes" by copying the file a `~lsst.resources.ResourcePath` points to into the datastore.

Storage classes and formatters are not stored in the registry: daf_butler takes them from the
repository's ``butler.yaml``, ``DAF_BUTLER_CONFIG_PATH`` and its own package configs, with no hook for
other packages.  So that the project's datasets work on any repository, importing this module makes
both known to daf_butler in this process (`install`) as fallbacks that the configuration overrides,
the way ``lsst.pipe.base.tests.mocks`` makes its mock storage classes known.  The wrapper task, the
``butlerfs`` and ``butler`` commands import it; any other reader needs ``import butlerfs.formatter``
before ``butler.get``, or `storage_class_config` in the repository's ``butler.yaml`` (``butlerfs
setup-repo``), or `write_config_dir` output on ``DAF_BUTLER_CONFIG_PATH``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar

from lsst.daf.butler import (
    Config,
    Formatter,
    FormatterFactory,
    FormatterV2,
    Location,
    LookupKey,
    StorageClass,
    StorageClassFactory,
)
from lsst.daf.butler.datastore.cache_manager import AbstractDatastoreCacheManager
from lsst.resources import ResourcePath, ResourcePathExpression

__all__ = [
    "STORAGE_CLASS_NAME",
    "FileArtifactFormatter",
    "install",
    "put_source_extension",
    "setup_repo",
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


def setup_repo(repo: ResourcePathExpression) -> bool:
    """Add `storage_class_config` to a repository's ``butler.yaml``.

    Parameters
    ----------
    repo : `lsst.resources.ResourcePathExpression`
        The repository's root (or its ``butler.yaml``).

    Returns
    -------
    changed : `bool`
        `False` if ``butler.yaml`` already defined ``ButlerfsFile`` and its formatter.

    Raises
    ------
    butlerfs.errors.UsageError
        Raised if there is no ``butler.yaml`` there, or it cannot be written.

    Notes
    -----
    Every process opening the repository then knows the storage class without importing butlerfs:
    a plain reader's ``butler.get``, a ``RemoteButler`` server.  Entries already there win.
    """
    from .errors import UsageError

    uri = ResourcePath(repo, forceDirectory=None)
    if uri.isdir():
        uri = uri.join("butler.yaml")
    if not uri.exists():
        raise UsageError(f"no butler.yaml at {uri}: give a repository's root")
    # A raw Config (not ButlerConfig): it merges no defaults, so only the file's own entries
    # are written back.
    config = Config(uri)
    snippet = storage_class_config()
    missing = {
        ("storageClasses", STORAGE_CLASS_NAME): snippet["storageClasses"][STORAGE_CLASS_NAME],
        ("datastore", "formatters", STORAGE_CLASS_NAME): snippet["datastore"]["formatters"][
            STORAGE_CLASS_NAME
        ],
    }
    missing = {key: value for key, value in missing.items() if key not in config}
    if not missing:
        return False
    for key, value in missing.items():
        config[key] = value
    try:
        config.dumpToUri(uri, overwrite=True)
    except OSError as err:
        raise UsageError(f"cannot write {uri}: {err.strerror or err}") from None
    return True


_PATCHED = "_butlerfs_fallback"
"""Attribute marking the daf_butler methods `install` has wrapped (an import may run twice)."""


def _names_file_storage_class(entity: Any) -> bool:
    """Whether a formatter lookup entity is, or has, the ``ButlerfsFile`` storage class."""
    if isinstance(entity, str):
        return entity == STORAGE_CLASS_NAME
    return any(key.name == STORAGE_CLASS_NAME for key in entity._lookupNames())


def install() -> None:
    """Make ``ButlerfsFile`` and `FileArtifactFormatter` known to daf_butler in this process.

    Notes
    -----
    Wraps ``StorageClassFactory.getStorageClass`` and the ``FormatterFactory`` lookups so that, when
    the configuration does not name them, ``ButlerfsFile`` resolves to the definition of
    `storage_class_config` and its datasets to `FileArtifactFormatter`.  This affects every Butler
    of the process, those made before the call included (a ``pipetask`` makes its Butler before it
    imports the task), and changes nothing for repositories whose configuration has them (a
    per-dataset-type ``extension`` parameter still comes from there).  Called on import of this
    module; idempotent.
    """
    original_get = StorageClassFactory.getStorageClass
    if getattr(original_get, _PATCHED, False):
        return

    def get_storage_class(self: StorageClassFactory, storageClassName: str) -> StorageClass:  # noqa: N803
        try:
            return original_get(self, storageClassName)
        except KeyError:
            if storageClassName != STORAGE_CLASS_NAME:
                raise
            # Through the config machinery, so that the definition equals the one a repository's
            # butler.yaml makes (a plain StorageClass differs in its delegate: a later Butler of
            # such a repository would refuse it).
            self.addFromConfig(Config({"storageClasses": storage_class_config()["storageClasses"]}))
            return original_get(self, storageClassName)

    original_class_with_match = FormatterFactory.getFormatterClassWithMatch

    def get_formatter_class_with_match(
        self: FormatterFactory, entity: Any
    ) -> tuple[LookupKey, type[Formatter | FormatterV2], dict[str, Any]]:
        try:
            return original_class_with_match(self, entity)
        except KeyError:
            if not _names_file_storage_class(entity):
                raise
            return LookupKey(name=STORAGE_CLASS_NAME), FileArtifactFormatter, {}

    original_with_match = FormatterFactory.getFormatterWithMatch

    def get_formatter_with_match(
        self: FormatterFactory, entity: Any, *args: Any, **kwargs: Any
    ) -> tuple[LookupKey, Formatter | FormatterV2]:
        try:
            return original_with_match(self, entity, *args, **kwargs)
        except KeyError:
            if not _names_file_storage_class(entity):
                raise
            return LookupKey(name=STORAGE_CLASS_NAME), FileArtifactFormatter(*args, **kwargs)

    for function in (get_storage_class, get_formatter_class_with_match, get_formatter_with_match):
        setattr(function, _PATCHED, True)
    StorageClassFactory.getStorageClass = get_storage_class  # type: ignore[method-assign]
    FormatterFactory.getFormatterClassWithMatch = get_formatter_class_with_match  # type: ignore[method-assign]
    FormatterFactory.getFormatterWithMatch = get_formatter_with_match  # type: ignore[method-assign]


install()
