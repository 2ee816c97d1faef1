"""Build a small Butler repository shaped like Rubin's DP0.2 / DC2 (``LSSTCam-imSim``) data.

The repository holds real FITS files (see `butlerfs.synth`) registered the way the LSST Science
Pipelines register them, down to the formatter names in the datastore records, so butlerfs can be
developed and tested against something faithful without afw or obs_lsst:

* ``raw`` (``Exposure``) in ``LSSTCam-imSim/raw/all``;
* ``bias`` and ``flat`` (``ExposureF``) in a calib RUN, certified into ``LSSTCam-imSim/calib``;
* ``postISRCCD`` (``Exposure``) stored as a disassembled composite, one file per component;
* ``calexp`` (``ExposureF``) plus a rerun RUN that shadows one of them;
* ``calexpBackground`` (``Background``) ingested from a Zip file (``butler ingest-zip``);
* the CHAINED collection ``LSSTCam-imSim/defaults`` over all of it.

Dataset IDs are UUIDv5 (``DATAID_TYPE_RUN``) and the pixels come from a seeded generator, so two
builds with the same arguments hold the same datasets and the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy
from astropy.io import fits
from astropy.time import Time, TimeDelta
from astropy.wcs import WCS
from lsst.daf.butler import (
    Butler,
    CollectionType,
    Config,
    DatasetIdGenEnum,
    DatasetRef,
    DatasetType,
    FileDataset,
    Timespan,
)
from lsst.daf.butler.datastore.record_data import DatastoreRecordData
from lsst.daf.butler.datastore.stored_file_info import StoredFileInfo
from lsst.daf.butler.datastores.fileDatastore import FileDatastore
from lsst.resources import ResourcePath
from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

from . import synth
from .errors import UsageError
from .formatter import FileArtifactFormatter, storage_class_config
from .registry import database_errors, database_location

__all__ = [
    "CALIB",
    "DEFAULTS",
    "FORMATTERS",
    "INSTRUMENT",
    "DemoSummary",
    "default_namespace",
    "make_demo_repo",
]

_log = logging.getLogger(__name__)

INSTRUMENT = "LSSTCam-imSim"
BANDS = ("r", "i", "g", "z", "y", "u")  # the order visits cycle through
FIRST_VISIT, VISIT_STEP = 733724, 37
FIRST_NIGHT_MJD = 60280.1  # 2023-12-02T02:24 TAI, day_obs 20231201
RAW_RUN = f"{INSTRUMENT}/raw/all"
CALIB_RUN = f"{INSTRUMENT}/calib/demo/20231201T000000Z"
CALIB = f"{INSTRUMENT}/calib"
ISR_RUN = f"{INSTRUMENT}/runs/demo/isr"
CALEXP_RUN = f"{INSTRUMENT}/runs/demo/calexp"
RERUN_RUN = f"{INSTRUMENT}/runs/demo/calexp-rerun"
RUNS_CHAIN = f"{INSTRUMENT}/runs/demo"
DEFAULTS = f"{INSTRUMENT}/defaults"

_FITS_EXPOSURE = "lsst.obs.base.formatters.fitsExposure.FitsExposureFormatter"
FORMATTERS = {
    "raw": "lsst.obs.lsst.rawFormatter.LsstCamImSimRawFormatter",
    "bias": _FITS_EXPOSURE,
    "flat": _FITS_EXPOSURE,
    "calexp": _FITS_EXPOSURE,
    "calexpBackground": "lsst.obs.base.formatters.fitsGeneric.FitsGenericFormatter",
    "postISRCCD.image": "lsst.obs.base.formatters.fitsExposure.FitsImageFormatter",
    "postISRCCD.mask": "lsst.obs.base.formatters.fitsExposure.FitsMaskFormatter",
    "postISRCCD.variance": "lsst.obs.base.formatters.fitsExposure.FitsImageFormatter",
}
"""Formatter recorded per dataset type (``type.component`` for disassembled ones), as obs_base does."""

_DATASET_TYPES = {  # name: (dimensions, storage class, is_calibration)
    "raw": (("instrument", "exposure", "detector"), "Exposure", False),
    "bias": (("instrument", "detector"), "ExposureF", True),
    "flat": (("instrument", "detector"), "ExposureF", True),
    "postISRCCD": (("instrument", "exposure", "detector"), "Exposure", False),
    "calexp": (("instrument", "visit", "detector"), "ExposureF", False),
    "calexpBackground": (("instrument", "visit", "detector"), "Background", False),
}


@dataclass
class DemoSummary:
    """What `make_demo_repo` built.

    Attributes
    ----------
    root : `str`
        Repository root (where ``butler.yaml``, and the SQLite registry if there is one, live).
    datastore_root : `str`
        URI of the datastore root.
    collections : `dict` [`str`, `str`]
        Collection name to type name (``RUN``, ``CALIBRATION``, ``CHAINED``).
    defaults : `str`
        The CHAINED collection that searches everything.
    dataset_counts : `dict` [`str`, `int`]
        Number of datasets per dataset type found (find-first) in ``defaults``: what a mount of
        ``defaults`` shows.  ``calexp`` has one more, shadowed, in ``CALEXP_RUN``.
    shadowed : `dict` [`str`, `int` | `str`]
        Data ID of the ``calexp`` found in both ``CALEXP_RUN`` and ``RERUN_RUN``; a find-first
        search of ``defaults`` returns the rerun's.
    visits, detectors : `list` [`int`]
        Visit (= exposure) and detector IDs.
    zip_dataset_type : `str`
        The dataset type whose artifacts are members of a Zip file (``...zip#zip-path=member``).
    disassembled_dataset_type : `str`
        The dataset type stored as a disassembled composite (one artifact per component).
    """

    root: str
    datastore_root: str
    collections: dict[str, str]
    defaults: str
    dataset_counts: dict[str, int]
    shadowed: dict[str, int | str]
    visits: list[int] = field(default_factory=list)
    detectors: list[int] = field(default_factory=list)
    zip_dataset_type: str = "calexpBackground"
    disassembled_dataset_type: str = "postISRCCD"


@dataclass(frozen=True)
class _Visit:
    id: int
    index: int
    band: str
    physical_filter: str
    day_obs: int
    begin: Time
    end: Time
    pointing: synth.Pointing
    seeing: float  # arcsec FWHM
    airmass: float

    @property
    def seq_num(self) -> int:
        """Sequence number within the night (two visits a night)."""
        return self.index % 2 + 1

    @property
    def obs_id(self) -> str:
        """Observation ID, imSim style."""
        return f"IM_P_{self.day_obs}_{self.seq_num:06d}"

    @property
    def sky(self) -> float:
        """Sky level in electrons per pixel for a 30 s exposure."""
        return {"u": 150.0, "g": 450.0, "r": 900.0, "i": 1300.0, "z": 1900.0, "y": 2300.0}[self.band]


def make_demo_repo(
    root: str,
    *,
    visits: int = 3,
    detectors: int = 4,
    image_size: int = 512,
    seed: int = 42,
    datastore_root: str | None = None,
    registry: str | None = None,
    namespace: str | None = None,
    force: bool = False,
) -> DemoSummary:
    """Create a DP0.2-shaped ``LSSTCam-imSim`` demo repository.

    Parameters
    ----------
    root : `str`
        Directory of the new repository; must not exist or be empty unless ``force``.
    visits : `int`, optional
        Number of visits (one exposure each).
    detectors : `int`, optional
        Number of detectors, IDs ``0..detectors-1`` (names ``R01_S00``...).
    image_size : `int`, optional
        Side of every detector image in pixels.
    seed : `int`, optional
        Seed of all random numbers.
    datastore_root : `str`, optional
        URI of the datastore root (e.g. ``s3://bucket/repo/``); the registry stays a local SQLite
        file under ``root`` unless ``registry`` is given.  Default: ``root`` itself.
    registry : `str`, optional
        SQLAlchemy URL of the registry database, e.g. ``postgresql://user@host:5432/db`` (needs
        ``butlerfs[postgres]`` and ``CREATE EXTENSION btree_gist`` in that database).  Default: a
        SQLite file under ``root``.
    namespace : `str`, optional
        Schema of a PostgreSQL registry holding this repository's tables, so that one database
        can hold several repositories.  Default: `default_namespace` of ``root``.
    force : `bool`, optional
        Delete an existing repository (the files under ``datastore_root`` and the registry's
        namespace included) first.

    Returns
    -------
    summary : `DemoSummary`
        Collections, counts and the shadowed data ID.

    Raises
    ------
    FileExistsError
        Raised if ``root`` (or ``datastore_root``) is not empty and ``force`` is false.
    ValueError
        Raised for sizes out of range (LSSTCam has 189 science detectors).
    UsageError
        Raised for a bad or (without ``force``) existing namespace, or a registry database that
        cannot be reached or used.
    """
    if visits < 1 or not 1 <= detectors <= len(synth.SCIENCE_RAFTS) * 9 or image_size < 16:
        raise ValueError(
            f"need visits >= 1, 1 <= detectors <= 189, image_size >= 16; got {visits}, "
            f"{detectors}, {image_size}"
        )
    t0 = time.perf_counter()
    if registry is not None and registry.startswith("postgresql"):
        namespace = namespace or default_namespace(root)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", namespace):
            raise UsageError(f"namespace {namespace!r}: use up to 63 letters, digits and underscores")
    elif namespace is not None:
        raise UsageError("a namespace needs a PostgreSQL registry (--registry postgresql://...)")
    with database_errors(lambda: database_location(registry or "sqlite://")):
        # The database first: if it cannot be reached, nothing has been deleted yet.
        if registry is not None and namespace is not None:
            _clear_namespace(registry, namespace, force)
        _clear(root, datastore_root, force)
        created = not Path(root).exists()
        try:
            _make_repo(root, datastore_root, registry, namespace)
        except BaseException:
            if created:
                shutil.rmtree(root, ignore_errors=True)
            raise
    butler = Butler.from_config(root, writeable=True)
    builder = _Builder(butler, visits, detectors, image_size, seed)
    with tempfile.TemporaryDirectory(prefix="butlerfs-demo-") as staging:
        builder.build(Path(staging))
    summary = builder.summary(root)
    _log.info(
        "Demo repository %s built in %.1f s: %s", root, time.perf_counter() - t0, summary.dataset_counts
    )
    return summary


def _clear(root: str, datastore_root: str | None, force: bool) -> None:
    """Refuse, or with ``force`` empty, an existing repository root and datastore root."""
    path = Path(root)
    targets: list[ResourcePath] = []
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        targets.append(ResourcePath(path.absolute(), forceDirectory=True))
    if datastore_root is not None:
        dstore = ResourcePath(datastore_root, forceDirectory=True)
        # An S3 "directory" does not exist() as an object: list it instead.
        if next(iter(ResourcePath.findFileResources([dstore])), None) is not None:
            targets.append(dstore)
    if targets and not force:
        raise FileExistsError(f"Not empty: {', '.join(map(str, targets))} (use force=True to rebuild)")
    for target in targets:
        _log.info("Removing %s", target)
        if target.isLocal:
            shutil.rmtree(target.ospath) if Path(target.ospath).is_dir() else Path(target.ospath).unlink()
        else:
            ResourcePath.mremove(list(ResourcePath.findFileResources([target])))


def _make_repo(root: str, datastore_root: str | None, registry: str | None, namespace: str | None) -> None:
    config: dict[str, Any] = storage_class_config()
    # So that a put() of a postISRCCD (with afw) would be disassembled like the demo's ones.
    config["datastore"]["composites"] = {"disassembled": {"postISRCCD": True}}
    if datastore_root is not None:
        config["datastore"]["root"] = str(ResourcePath(datastore_root, forceDirectory=True))
    if registry is not None:
        config["registry"] = {"db": registry, **({"namespace": namespace} if namespace else {})}
    Butler.makeRepo(root, config=Config(config), forceConfigRoot=datastore_root is None)


def default_namespace(root: str) -> str:
    """Return the PostgreSQL namespace a demo repository at ``root`` gets by default.

    ``demo_<name>_<hash>``: the root directory's name, made a plain identifier, and eight hex
    digits of its absolute path, so two roots never share a namespace.
    """
    path = Path(root).absolute()
    name = re.sub(r"[^a-z0-9_]+", "_", path.name.lower()).strip("_")[:30] or "repo"
    return f"demo_{name}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def _clear_namespace(registry: str, namespace: str, force: bool) -> None:
    """Refuse, or with ``force`` drop, an existing namespace of a PostgreSQL registry."""
    engine = sqlalchemy.create_engine(registry, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            if namespace not in sqlalchemy.inspect(conn).get_schema_names():
                return
            if not force:
                where = engine.url.render_as_string(hide_password=True)
                raise UsageError(
                    f"namespace {namespace} of {where} exists: pass --force to replace it, "
                    "or choose another --namespace"
                )
            _log.info("Dropping namespace %s", namespace)
            conn.execute(sqlalchemy.text(f'DROP SCHEMA "{namespace}" CASCADE'))
            conn.commit()
    finally:
        engine.dispose()


class _Builder:
    """Builds the content of one demo repository; see `make_demo_repo`."""

    def __init__(self, butler: Butler, n_visits: int, n_detectors: int, size: int, seed: int):
        self.butler = butler
        self.size = size
        self.seed = seed
        self.detectors = [synth.detector_geometry(d) for d in range(n_detectors)]
        self.visits = [self._visit(i) for i in range(n_visits)]
        self.shadowed: dict[str, int | str] = {}
        self._calib_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _visit(self, i: int) -> _Visit:
        rng = self._rng(1, i)
        band = BANDS[i % len(BANDS)]
        begin = Time(FIRST_NIGHT_MJD + i // 2 + (i % 2) * 0.0125, format="mjd", scale="tai")
        day_obs = int((begin - TimeDelta(0.5, format="jd")).strftime("%Y%m%d"))
        pointing = synth.Pointing(
            ra=62.0 + rng.uniform(-2.5, 2.5), dec=-37.5 + rng.uniform(-2.0, 2.0), rot=rng.uniform(0, 360)
        )
        return _Visit(
            id=FIRST_VISIT + VISIT_STEP * i,
            index=i,
            band=band,
            physical_filter=f"{band}_sim_1.4",
            day_obs=day_obs,
            begin=begin,
            end=begin + TimeDelta(30.0, format="sec"),
            pointing=pointing,
            seeing=rng.uniform(0.55, 1.1),
            airmass=rng.uniform(1.0, 1.6),
        )

    # -- orchestration ---------------------------------------------------------------------------

    def build(self, staging: Path) -> None:
        """Register everything and write every artifact, staging files under ``staging``."""
        records = self._dimension_records()
        _insert_records(self.butler, records)
        for name, (dims, sc, is_calib) in _DATASET_TYPES.items():
            self.butler.registry.registerDatasetType(
                DatasetType(name, dims, sc, universe=self.butler.dimensions, isCalibration=is_calib)
            )
        for stage in (self._calibs, self._raws, self._postisr, self._calexps):
            with _timed(stage.__name__.strip("_")):
                stage(staging)
        with _timed("backgrounds_zip"):
            self._backgrounds_zip(staging, records)
        self.butler.collections.register(RUNS_CHAIN, CollectionType.CHAINED)
        self.butler.collections.redefine_chain(RUNS_CHAIN, [RERUN_RUN, CALEXP_RUN, ISR_RUN])
        self.butler.collections.register(DEFAULTS, CollectionType.CHAINED)
        self.butler.collections.redefine_chain(DEFAULTS, [RUNS_CHAIN, RAW_RUN, CALIB])

    def summary(self, root: str) -> DemoSummary:
        """Describe the finished repository."""
        info = self.butler.collections.query_info("*")
        return DemoSummary(
            root=str(root),
            datastore_root=str(_file_datastore(self.butler).root),
            collections={c.name: c.type.name for c in info},
            defaults=DEFAULTS,
            dataset_counts={
                name: len(self.butler.query_datasets(name, DEFAULTS, limit=None, explain=False))
                for name in _DATASET_TYPES
            },
            shadowed=dict(self.shadowed),
            visits=[v.id for v in self.visits],
            detectors=[d.id for d in self.detectors],
        )

    # -- dimension records -----------------------------------------------------------------------

    def _dimension_records(self) -> dict[str, list[dict[str, Any]]]:
        rec: dict[str, list[dict[str, Any]]] = {
            "instrument": [
                dict(
                    name=INSTRUMENT,
                    visit_max=7050000,
                    visit_system=0,
                    exposure_max=7050000,
                    detector_max=189,
                    class_name="lsst.obs.lsst.LsstCamImSim",
                )
            ],
            "physical_filter": [dict(instrument=INSTRUMENT, name=f"{b}_sim_1.4", band=b) for b in "ugrizy"],
            "detector": [
                dict(
                    instrument=INSTRUMENT,
                    id=d.id,
                    full_name=d.full_name,
                    name_in_raft=d.name_in_raft,
                    raft=d.raft,
                    purpose="SCIENCE",
                )
                for d in self.detectors
            ],
            "visit_system": [dict(instrument=INSTRUMENT, id=0, name="one-to-one")],
        }
        universe = self.butler.dimensions
        for day in sorted({v.day_obs for v in self.visits}):
            noon = Time(f"{str(day)[:4]}-{str(day)[4:6]}-{str(day)[6:]}T12:00:00", scale="tai")
            span = Timespan(noon, noon + TimeDelta(1.0, format="jd"))
            rec.setdefault("day_obs", []).append(dict(instrument=INSTRUMENT, id=day, timespan=span))
        for v in self.visits:
            span = Timespan(v.begin, v.end)
            zenith = float(np.degrees(np.arccos(1.0 / v.airmass)))
            common = dict(instrument=INSTRUMENT, day_obs=v.day_obs, physical_filter=v.physical_filter)
            common.update(seq_num=v.seq_num, exposure_time=30.0, target_name="WFD", zenith_angle=zenith)
            common.update(observation_reason="science", science_program="DC2", azimuth=0.0, timespan=span)
            if "group" in universe.elements.names:
                rec.setdefault("group", []).append(dict(instrument=INSTRUMENT, name=str(v.id)))
                common_exp = dict(group=str(v.id))
            else:
                common_exp = {}
            rec.setdefault("exposure", []).append(
                dict(
                    common,
                    **common_exp,
                    id=v.id,
                    obs_id=v.obs_id,
                    dark_time=30.0,
                    observation_type="science",
                    seq_start=v.seq_num,
                    seq_end=v.seq_num,
                    tracking_ra=v.pointing.ra,
                    tracking_dec=v.pointing.dec,
                    sky_angle=v.pointing.rot,
                    has_simulated=True,
                    can_see_sky=True,
                )
            )
            corners = {d.id: self._corners(v, d) for d in self.detectors}
            hull = ConvexPolygon.convexHull([p for c in corners.values() for p in c])
            rec.setdefault("visit", []).append(dict(common, id=v.id, name=str(v.id), region=hull))
            rec.setdefault("visit_definition", []).append(
                dict(instrument=INSTRUMENT, exposure=v.id, visit=v.id)
            )
            rec.setdefault("visit_system_membership", []).append(
                dict(instrument=INSTRUMENT, visit_system=0, visit=v.id)
            )
            rec.setdefault("visit_detector_region", []).extend(
                dict(instrument=INSTRUMENT, visit=v.id, detector=d, region=ConvexPolygon.convexHull(c))
                for d, c in corners.items()
            )
        return rec

    def _wcs(self, v: _Visit, d: synth.DetectorGeometry) -> fits.Header:
        return synth.tan_wcs_header(v.pointing, d, self.size)

    def _corners(self, v: _Visit, d: synth.DetectorGeometry) -> list[UnitVector3d]:
        lo, hi = 0.5, self.size + 0.5
        ra, dec = WCS(self._wcs(v, d)).all_pix2world([lo, hi, hi, lo], [lo, lo, hi, hi], 1)
        return [UnitVector3d(LonLat.fromDegrees(float(a), float(b))) for a, b in zip(ra, dec, strict=True)]

    # -- artifacts -------------------------------------------------------------------------------

    def _header(self, kind: str, v: _Visit | None, d: synth.DetectorGeometry, run: str) -> fits.Header:
        hdr = fits.Header()
        hdr["INSTRUME"], hdr["TELESCOP"], hdr["TIMESYS"] = INSTRUMENT, "LSST", "TAI"
        hdr["DETECTOR"], hdr["DET_NAME"] = d.id, d.full_name
        hdr["RAFTBAY"], hdr["CCDSLOT"] = d.raft, d.name_in_raft
        hdr["IMGTYPE"] = kind.upper() if v is None else "SKYEXP"
        if v is not None:
            hdr["OBSID"] = v.obs_id
            hdr["VISIT"], hdr["EXPID"], hdr["DAYOBS"] = v.id, v.id, str(v.day_obs)
            hdr["FILTER"], hdr["BAND"] = v.physical_filter, v.band
            hdr["MJD-OBS"], hdr["DATE-OBS"] = v.begin.mjd, v.begin.isot
            hdr["MJD-END"], hdr["DATE-END"] = v.end.mjd, v.end.isot
            hdr["EXPTIME"], hdr["DARKTIME"] = 30.0, 30.0
            hdr["RATEL"], hdr["DECTEL"] = v.pointing.ra, v.pointing.dec
            hdr["ROTANGLE"], hdr["AIRMASS"], hdr["SEEING"] = v.pointing.rot, v.airmass, v.seeing
            hdr["BUNIT"] = "adu" if kind == "raw" else "electron"
        hdr["ORIGIN"] = "butlerfs demo (synthetic)"
        hdr["HIERARCH LSST BUTLER DATASETTYPE"] = kind
        hdr["HIERARCH LSST BUTLER RUN"] = run
        return hdr

    def _calib_planes(self, d: synth.DetectorGeometry) -> tuple[np.ndarray, np.ndarray]:
        """Bias structure (ADU, after overscan subtraction) and flat of one detector."""
        if d.id not in self._calib_cache:
            rng = self._rng(2, d.id)
            self._calib_cache[d.id] = (
                synth.bias_structure(self.size, rng),
                synth.flat_pattern(self.size, d, rng),
            )
        return self._calib_cache[d.id]

    def _exposure_pixels(self, v: _Visit, d: synth.DetectorGeometry, rerun: bool = False) -> dict[str, Any]:
        """Simulate one detector of one visit; a rerun differs in its noise only."""
        rng = self._rng(3, v.index, d.id)
        fwhm_px = v.seeing / synth.PIXEL_SCALE
        n_sources = int(rng.integers(100, 301))
        scene, _ = synth.render_scene(self.size, rng, n_sources=n_sources, fwhm_px=fwhm_px, sky=v.sky)
        bias, flat = self._calib_planes(d)
        pix = synth.simulate_exposure(scene, v.sky, bias, flat, self._rng(4, v.index, d.id, int(rerun)))
        return dict(pix, scene=scene, fwhm_px=fwhm_px)

    def _ref(self, name: str, data_id: dict[str, Any], run: str) -> DatasetRef:
        dt = self.butler.get_dataset_type(name)
        expanded = self.butler.registry.expandDataId(instrument=INSTRUMENT, **data_id)
        return DatasetRef(dt, expanded, run=run, id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN)

    def _ingest(self, staging: Path, items: list[tuple[DatasetRef, fits.HDUList]]) -> list[DatasetRef]:
        """Write the HDU lists to ``staging``, ingest them, then record obs_base formatter names."""
        datasets = []
        for ref, hdul in items:
            path = staging / f"{ref.id}.fits"
            hdul[0].header["HIERARCH LSST BUTLER ID"] = str(ref.id)
            hdul.writeto(path, output_verify="silentfix")
            datasets.append(FileDataset(path=str(path), refs=[ref], formatter=FileArtifactFormatter))
        self.butler.ingest(*datasets, transfer="move")
        refs = [ref for ref, _ in items]
        _set_formatter(self.butler, refs, FORMATTERS[refs[0].datasetType.name])
        return refs

    def _calibs(self, staging: Path) -> None:
        items = []
        for d in self.detectors:
            bias, flat = self._calib_planes(d)
            wcs = fits.Header()
            for kind, img, var in (("bias", bias, np.full_like(bias, 2.25)), ("flat", flat, flat * 1e-4)):
                hdr = self._header(kind, None, d, CALIB_RUN)
                hdr["HIERARCH CALIBDATE"] = "2023-12-01T00:00:00"
                hdul = synth.exposure_hdus(hdr, wcs, img, np.zeros(img.shape, np.int32), var)
                items.append((self._ref(kind, dict(detector=d.id), CALIB_RUN), hdul))
        refs = self._ingest(staging, items)
        self.butler.collections.register(CALIB, CollectionType.CALIBRATION)
        pad = TimeDelta(30.0, format="jd")
        span = Timespan(self.visits[0].begin - pad, self.visits[-1].end + pad)
        self.butler.registry.certify(CALIB, refs, span)

    def _raws(self, staging: Path) -> None:
        items = []
        for v in self.visits:
            for d in self.detectors:
                pix = self._exposure_pixels(v, d)
                hdr = self._header("raw", v, d, RAW_RUN)
                image = fits.ImageHDU(pix["raw"], header=self._wcs(v, d), name="IMAGE")
                image.header["BIASLVL"] = synth.BIAS_LEVEL
                image.header["GAIN"], image.header["RDNOISE"] = synth.GAIN, synth.READ_NOISE
                ref = self._ref("raw", dict(exposure=v.id, detector=d.id), RAW_RUN)
                items.append((ref, fits.HDUList([fits.PrimaryHDU(header=hdr), image])))
        self._ingest(staging, items)

    def _calexp_hdul(
        self, v: _Visit, d: synth.DetectorGeometry, run: str, rerun: bool = False
    ) -> fits.HDUList:
        pix = self._exposure_pixels(v, d, rerun=rerun)
        hdr = self._header("calexp", v, d, run)
        mask = synth.calexp_mask(pix["mask"], pix["scene"], v.sky)
        hdr["SKYLEVEL"] = (v.sky, "mean sky level in electrons")
        hdr["PSF_FWHM"] = (pix["fwhm_px"], "PSF FWHM in pixels")
        return synth.exposure_hdus(hdr, self._wcs(v, d), pix["image"], mask, pix["variance"])

    def _calexps(self, staging: Path) -> None:
        items = [
            (
                self._ref("calexp", dict(visit=v.id, detector=d.id), CALEXP_RUN),
                self._calexp_hdul(v, d, CALEXP_RUN),
            )
            for v in self.visits
            for d in self.detectors
        ]
        self._ingest(staging, items)
        v, d = self.visits[0], self.detectors[-1]
        self.shadowed = dict(instrument=INSTRUMENT, visit=v.id, detector=d.id)
        rerun = self._calexp_hdul(v, d, RERUN_RUN, rerun=True)
        self._ingest(staging, [(self._ref("calexp", dict(visit=v.id, detector=d.id), RERUN_RUN), rerun)])

    def _postisr(self, staging: Path) -> None:
        """Store ``postISRCCD`` as a disassembled composite: one FITS file and record per component.

        A real ``put`` disassembles through the ``Exposure`` storage class delegate, which lives in
        obs_base and needs afw objects.  So the component files are written where the datastore's
        file templates put them, the datasets are inserted into the registry, and the datastore rows
        (one per component, ``component`` column set) go in through ``Datastore.import_records`` --
        the datastore's own record-import API, the one daf_butler uses to bring the records of
        quantum-backed (pipeline) outputs into a repository.
        """
        datastore = _file_datastore(self.butler)
        data_ids = [dict(exposure=v.id, detector=d.id) for v in self.visits for d in self.detectors]
        self.butler.collections.register(ISR_RUN)
        refs = self.butler.registry.insertDatasets(
            "postISRCCD",
            [dict(instrument=INSTRUMENT, **di) for di in data_ids],
            run=ISR_RUN,
            idGenerationMode=DatasetIdGenEnum.DATAID_TYPE_RUN,
        )
        by_key = {(r.dataId["exposure"], r.dataId["detector"]): r for r in refs}
        records: dict[Any, dict[str, list[Any]]] = {}
        components = refs[0].datasetType.storageClass.components
        for v in self.visits:
            for d in self.detectors:
                ref = by_key[(v.id, d.id)]
                ref = ref.expanded(self.butler.registry.expandDataId(ref.dataId))
                pix = self._exposure_pixels(v, d)
                infos = []
                for comp, data in (
                    ("image", pix["image"]),
                    ("mask", pix["mask"]),
                    ("variance", pix["variance"]),
                ):
                    hdr = self._header("postISRCCD", v, d, ISR_RUN)
                    hdr["HIERARCH LSST BUTLER ID"], hdr["HIERARCH LSST BUTLER COMPONENT"] = str(ref.id), comp
                    hdr.update(self._wcs(v, d) if comp != "mask" else synth.mask_header())
                    dtype = np.int32 if comp == "mask" else np.float32
                    blob = synth.hdul_bytes(fits.HDUList([fits.PrimaryHDU(data.astype(dtype), header=hdr)]))
                    comp_ref = ref.makeComponentRef(comp)
                    path = datastore.templates.getTemplate(comp_ref).format(comp_ref) + ".fits"
                    datastore.locationFactory.fromPath(path, trusted_path=True).uri.write(blob)
                    infos.append(
                        StoredFileInfo(
                            formatter=FORMATTERS[f"postISRCCD.{comp}"],
                            path=path,
                            storageClass=components[comp],
                            component=comp,
                            checksum=None,
                            file_size=len(blob),
                        )
                    )
                records[ref.id] = {datastore._table.name: infos}
        with self.butler.transaction():
            datastore.import_records({datastore.name: DatastoreRecordData(records=records)})

    def _backgrounds_zip(self, staging: Path, dim_records: dict[str, list[dict[str, Any]]]) -> None:
        """Build ``calexpBackground`` in a throw-away repo, zip it there, ``ingest_zip`` it here."""
        stage_root = staging / "zip-staging-repo"
        Butler.makeRepo(str(stage_root), config=Config(storage_class_config()))
        other = Butler.from_config(str(stage_root), writeable=True)
        _insert_records(other, dim_records)
        dims, sc, _ = _DATASET_TYPES["calexpBackground"]
        dt = DatasetType("calexpBackground", dims, sc, universe=other.dimensions)
        other.registry.registerDatasetType(dt)
        datasets = []
        for v in self.visits:
            for d in self.detectors:
                data_id = other.registry.expandDataId(instrument=INSTRUMENT, visit=v.id, detector=d.id)
                ref = DatasetRef(
                    dt, data_id, run=CALEXP_RUN, id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN
                )
                _, flat = self._calib_planes(d)
                hdr = self._header("calexpBackground", v, d, CALEXP_RUN)
                hdr["HIERARCH LSST BUTLER ID"] = str(ref.id)
                path = staging / f"{ref.id}.fits"
                synth.background_hdus(hdr, v.sky * flat, bin_size=max(self.size // 8, 1)).writeto(path)
                datasets.append(FileDataset(path=str(path), refs=[ref], formatter=FileArtifactFormatter))
        other.registry.registerRun(CALEXP_RUN)
        other.ingest(*datasets, transfer="move")
        refs = [ds.refs[0] for ds in datasets]
        zip_uri = other.retrieve_artifacts_zip(refs, staging / "zip")
        self.butler.ingest_zip(zip_uri, transfer="copy")
        _set_formatter(self.butler, refs, FORMATTERS["calexpBackground"])


def _file_datastore(butler: Butler) -> FileDatastore:
    """Return the `FileDatastore` of a direct butler (the demo writes its records itself)."""
    datastore = getattr(butler, "_datastore", None)
    if not isinstance(datastore, FileDatastore):
        raise TypeError(f"the demo repository needs a FileDatastore, not {type(datastore).__name__}")
    return datastore


def _insert_records(butler: Butler, records: dict[str, list[dict[str, Any]]]) -> None:
    """Insert dimension records, element by element in dependency order (the dict's order)."""
    for element, rows in records.items():
        butler.registry.insertDimensionData(element, *rows)


def _set_formatter(butler: Butler, refs: list[DatasetRef], formatter: str) -> None:
    """Rewrite the ``formatter`` column of the datastore records of ``refs``.

    Notes
    -----
    Ingest imports the formatter class, so files are ingested with `FileArtifactFormatter` and the
    rows are then rewritten to the obs_base name a real repository records.  The rows go through the
    datastore's opaque-table API (``fetch`` + ``replace``: SQLAlchemy on the registry database), so
    this works for any registry database, not only SQLite.
    """
    table = _file_datastore(butler)._table
    rows = [dict(row) for row in table.fetch(dataset_id=[ref.id for ref in refs])]
    for row in rows:
        row["formatter"] = formatter
    with butler.transaction():
        table.replace(*rows)


@contextlib.contextmanager
def _timed(what: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    _log.info("%s took %.2f s", what, time.perf_counter() - t)
