"""Synthetic DC2-like pixels and FITS files for the demo repository.

Everything here is pure numpy + astropy and deterministic given a `numpy.random.Generator`.  The
layout follows what the LSST Science Pipelines write: an afw ``Exposure`` is a multi-extension FITS
file with an empty primary HDU and ``IMAGE``, ``MASK`` and ``VARIANCE`` image extensions (plus binary
tables this demo leaves out); a component of a disassembled exposure is a single-HDU FITS file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from astropy.io import fits

__all__ = [
    "MASK_PLANES",
    "DetectorGeometry",
    "Pointing",
    "background_hdus",
    "bias_structure",
    "calexp_mask",
    "detector_geometry",
    "exposure_hdus",
    "flat_pattern",
    "hdul_bytes",
    "mask_header",
    "render_scene",
    "simulate_exposure",
    "tan_wcs_header",
]

PIXEL_SCALE = 0.2  # arcsec / pixel, LSSTCam
# Focal plane pitches (deg) for LSSTCam: 42.25 mm sensors and 127 mm rafts, 10 um pixels of 0.2".
SENSOR_PITCH = 42.25e-3 / 10e-6 * PIXEL_SCALE / 3600.0
RAFT_PITCH = 127.0e-3 / 10e-6 * PIXEL_SCALE / 3600.0
# Science rafts in LSSTCam detector-number order (corner rafts carry no science detectors).
_CORNERS = {(0, 0), (0, 4), (4, 0), (4, 4)}
SCIENCE_RAFTS = [f"R{x}{y}" for x in range(5) for y in range(5) if (x, y) not in _CORNERS]
MASK_PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "DETECTED": 5, "SUSPECT": 7, "NO_DATA": 8}
GAIN = 1.0  # e-/ADU
READ_NOISE = 5.0  # e-
BIAS_LEVEL = 15000.0  # ADU, what "overscan subtraction" removes


@dataclass(frozen=True)
class DetectorGeometry:
    """Name and focal-plane position of one LSSTCam science detector.

    Attributes
    ----------
    id : `int`
        Detector number (0..188).
    raft, name_in_raft, full_name : `str`
        E.g. ``R01``, ``S00``, ``R01_S00``.
    x, y : `float`
        Offset of the detector centre from the boresight, in degrees on the focal plane.
    """

    id: int
    raft: str
    name_in_raft: str
    full_name: str
    x: float
    y: float


@dataclass(frozen=True)
class Pointing:
    """Telescope boresight of one visit.

    Attributes
    ----------
    ra, dec : `float`
        Boresight in degrees.
    rot : `float`
        Sky rotation angle in degrees.
    """

    ra: float
    dec: float
    rot: float


def detector_geometry(detector: int) -> DetectorGeometry:
    """Return the LSSTCam name and focal-plane position of a science detector.

    Parameters
    ----------
    detector : `int`
        Detector number, 0..188.

    Returns
    -------
    geometry : `DetectorGeometry`
        Names (``R01_S00`` style) and focal plane offset in degrees.
    """
    raft = SCIENCE_RAFTS[detector // 9]
    sx, sy = divmod(detector % 9, 3)
    rx, ry = int(raft[1]), int(raft[2])
    x = (rx - 2) * RAFT_PITCH + (sx - 1) * SENSOR_PITCH
    y = (ry - 2) * RAFT_PITCH + (sy - 1) * SENSOR_PITCH
    name = f"S{sx}{sy}"
    return DetectorGeometry(detector, raft, name, f"{raft}_{name}", x, y)


def _deproject(ra0: float, dec0: float, xi: float, eta: float) -> tuple[float, float]:
    """Invert the gnomonic projection: tangent-plane offsets (deg) about (ra0, dec0) to RA/Dec (deg)."""
    a0, d0 = np.radians(ra0), np.radians(dec0)
    x, y = np.radians(xi), np.radians(eta)
    denom = np.cos(d0) - y * np.sin(d0)
    ra = a0 + np.arctan2(x, denom)
    dec = np.arctan2(np.sin(d0) + y * np.cos(d0), np.hypot(x, denom))
    return float(np.degrees(ra) % 360.0), float(np.degrees(dec))


def tan_wcs_header(pointing: Pointing, geom: DetectorGeometry, size: int) -> fits.Header:
    """Return the TAN WCS cards of a detector image.

    Parameters
    ----------
    pointing : `Pointing`
        Boresight and rotation of the visit.
    geom : `DetectorGeometry`
        Where the detector sits on the focal plane.
    size : `int`
        Image side in pixels; the reference pixel is the image centre.

    Returns
    -------
    header : `astropy.io.fits.Header`
        ``CTYPE``/``CRVAL``/``CRPIX``/``CD`` cards (RA increases to the left, as on the sky).
    """
    rot = np.radians(pointing.rot)
    c, s = np.cos(rot), np.sin(rot)
    xi, eta = c * geom.x - s * geom.y, s * geom.x + c * geom.y
    ra, dec = _deproject(pointing.ra, pointing.dec, xi, eta)
    scale = PIXEL_SCALE / 3600.0
    hdr = fits.Header()
    hdr["WCSAXES"] = 2
    hdr["CTYPE1"], hdr["CTYPE2"] = "RA---TAN", "DEC--TAN"
    hdr["CUNIT1"], hdr["CUNIT2"] = "deg", "deg"
    hdr["CRPIX1"] = hdr["CRPIX2"] = (size + 1) / 2.0
    hdr["CRVAL1"], hdr["CRVAL2"] = ra, dec
    hdr["CD1_1"], hdr["CD1_2"] = -scale * c, scale * s
    hdr["CD2_1"], hdr["CD2_2"] = scale * s, scale * c
    hdr["RADESYS"], hdr["EQUINOX"] = "ICRS", 2000.0
    return hdr


def flat_pattern(size: int, geom: DetectorGeometry, rng: np.random.Generator) -> np.ndarray:
    """Return a flat field: vignetting-like gradient, tree-ring-ish ripple and pixel response noise.

    Parameters
    ----------
    size : `int`
        Image side in pixels.
    geom : `DetectorGeometry`
        Detector, for the gradient across the focal plane.
    rng : `numpy.random.Generator`
        Random numbers.

    Returns
    -------
    flat : `numpy.ndarray`
        ``float32`` array of mean ~1.
    """
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    r_fp = np.hypot(geom.x + xx * SENSOR_PITCH, geom.y + yy * SENSOR_PITCH)
    flat = 1.0 - 0.04 * (r_fp / 1.75) ** 2
    flat *= 1.0 + 0.003 * np.sin(2 * np.pi * np.hypot(xx + 0.5, yy + 0.5) * 12.0)
    flat *= 1.0 + 0.01 * rng.standard_normal((size, size))
    return (flat / flat.mean()).astype(np.float32)


def bias_structure(size: int, rng: np.random.Generator) -> np.ndarray:
    """Return the structure left in a bias frame after overscan subtraction.

    Parameters
    ----------
    size : `int`
        Image side in pixels.
    rng : `numpy.random.Generator`
        Random numbers.

    Returns
    -------
    bias : `numpy.ndarray`
        ``float32`` array in ADU: an exponential roll-off along rows, a slope and pixel noise.
    """
    yy, xx = np.mgrid[0:size, 0:size] / size
    bias = 3.0 * np.exp(-xx * 8) + 0.5 * yy + rng.normal(0.0, 1.5, (size, size))
    return bias.astype(np.float32)


def simulate_exposure(
    scene: np.ndarray, sky: float, bias: np.ndarray, flat: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Observe a scene: electrons to raw ADU, then back through bias and flat correction (ISR).

    Parameters
    ----------
    scene : `numpy.ndarray`
        Noise-free sources in electrons (see `render_scene`).
    sky : `float`
        Sky level in electrons per pixel.
    bias, flat : `numpy.ndarray`
        Bias structure (ADU) and flat field of the detector.
    rng : `numpy.random.Generator`
        Random numbers for the noise and the bad column.

    Returns
    -------
    planes : `dict` [`str`, `numpy.ndarray`]
        ``raw`` (``uint16`` ADU, saturating at 65535), and the ISR-corrected ``image`` and
        ``variance`` (electrons) and ``mask`` (``SAT`` and one ``BAD`` column).
    """
    expected = flat * (sky + scene)
    electrons = expected + np.sqrt(expected + READ_NOISE**2) * rng.standard_normal(expected.shape)
    raw = np.clip(np.rint(BIAS_LEVEL + bias + electrons / GAIN), 0, 65535).astype(np.uint16)
    image = (raw - BIAS_LEVEL - bias) * GAIN / flat
    variance = (np.maximum(image, 0) + READ_NOISE**2) / flat
    mask = np.where(raw == 65535, 1 << MASK_PLANES["SAT"], 0).astype(np.int32)
    mask[:, int(rng.integers(0, raw.shape[1]))] |= 1 << MASK_PLANES["BAD"]
    return dict(raw=raw, image=image, variance=variance, mask=mask)


def calexp_mask(mask: np.ndarray, scene: np.ndarray, sky: float) -> np.ndarray:
    """Add the ``DETECTED`` (5 sigma above sky) and ``EDGE`` (4-pixel border) planes to a mask.

    Parameters
    ----------
    mask : `numpy.ndarray`
        ISR mask.
    scene : `numpy.ndarray`
        Noise-free sources in electrons.
    sky : `float`
        Sky level in electrons per pixel.

    Returns
    -------
    mask : `numpy.ndarray`
        A new ``int32`` mask.
    """
    out = mask.astype(np.int32)
    out[scene > 5.0 * np.sqrt(sky)] |= 1 << MASK_PLANES["DETECTED"]
    for edge in (np.s_[:4, :], np.s_[-4:, :], np.s_[:, :4], np.s_[:, -4:]):
        out[edge] |= 1 << MASK_PLANES["EDGE"]
    return out


def render_scene(
    size: int, rng: np.random.Generator, *, n_sources: int, fwhm_px: float, sky: float
) -> tuple[np.ndarray, np.ndarray]:
    """Render point sources and a few small galaxies, noise-free, in electrons.

    Parameters
    ----------
    size : `int`
        Image side in pixels.
    rng : `numpy.random.Generator`
        Random numbers.
    n_sources : `int`
        Number of sources; ~85% are Gaussian-PSF stars, the rest elliptical Gaussian galaxies.
    fwhm_px : `float`
        PSF FWHM in pixels.
    sky : `float`
        Sky level in electrons per pixel; the faintest sources are ~8 sigma above it.

    Returns
    -------
    scene : `numpy.ndarray`
        ``float64`` image of the sources.
    table : `numpy.ndarray`
        Structured array (x, y, flux, sigma) of what was drawn.
    """
    psf_sigma = fwhm_px / 2.3548
    # Number counts N(>F) ~ F^-0.6 from a PSF-flux S/N of ~8 up to bright, saturating stars.
    f_min = 8.0 * np.sqrt(sky) * np.sqrt(4 * np.pi) * psf_sigma
    flux = np.minimum(f_min * rng.uniform(size=n_sources) ** (-1 / 0.6), 3.0e6)
    x, y = rng.uniform(-5, size + 5, n_sources), rng.uniform(-5, size + 5, n_sources)
    galaxy = rng.uniform(size=n_sources) < 0.15
    sig_a = np.where(galaxy, psf_sigma * rng.uniform(1.5, 3.0, n_sources), psf_sigma)
    sig_b = np.where(galaxy, sig_a * rng.uniform(0.5, 1.0, n_sources), psf_sigma)
    theta = rng.uniform(0, np.pi, n_sources)
    scene = np.zeros((size, size))
    for i in range(n_sources):
        half = int(np.ceil(5 * sig_a[i]))
        x0, x1 = max(int(x[i]) - half, 0), min(int(x[i]) + half + 1, size)
        y0, y1 = max(int(y[i]) - half, 0), min(int(y[i]) + half + 1, size)
        if x0 >= x1 or y0 >= y1:
            continue
        dy, dx = np.mgrid[y0:y1, x0:x1]
        dx, dy = dx - x[i], dy - y[i]
        c, s = np.cos(theta[i]), np.sin(theta[i])
        u, v = (c * dx + s * dy) / sig_a[i], (-s * dx + c * dy) / sig_b[i]
        scene[y0:y1, x0:x1] += flux[i] / (2 * np.pi * sig_a[i] * sig_b[i]) * np.exp(-0.5 * (u * u + v * v))
    table = np.rec.fromarrays([x, y, flux, sig_a], names="x,y,flux,sigma")
    return scene, table


def mask_header() -> fits.Header:
    """Return the afw-style ``MP_<plane> = bit`` cards of a mask HDU."""
    hdr = fits.Header()
    for name, bit in MASK_PLANES.items():
        hdr[f"HIERARCH MP_{name}" if len(name) > 5 else f"MP_{name}"] = bit
    return hdr


def exposure_hdus(
    primary: fits.Header,
    wcs: fits.Header,
    image: np.ndarray,
    mask: np.ndarray,
    variance: np.ndarray,
) -> fits.HDUList:
    """Lay out an afw-``Exposure``-like multi-extension FITS file.

    Parameters
    ----------
    primary : `astropy.io.fits.Header`
        Cards of the (data-less) primary HDU.
    wcs : `astropy.io.fits.Header`
        WCS cards, copied into each image extension.
    image, mask, variance : `numpy.ndarray`
        The three planes; cast to ``float32``, ``int32`` and ``float32``.

    Returns
    -------
    hdul : `astropy.io.fits.HDUList`
        Primary HDU + ``IMAGE``, ``MASK`` and ``VARIANCE`` extensions.
    """
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [fits.PrimaryHDU(header=primary)]
    for extname, data, extra in (
        ("IMAGE", image.astype(np.float32), fits.Header()),
        ("MASK", mask.astype(np.int32), mask_header()),
        ("VARIANCE", variance.astype(np.float32), fits.Header()),
    ):
        hdr = wcs.copy()
        hdr.update(extra)
        hdr["INHERIT"] = True
        hdr["EXTTYPE"] = extname
        hdus.append(fits.ImageHDU(data=data, header=hdr, name=extname))
    return fits.HDUList(hdus)


def background_hdus(primary: fits.Header, sky: np.ndarray, bin_size: int) -> fits.HDUList:
    """Lay out a ``BackgroundList``-like FITS file: the binned sky model and its statistics.

    Parameters
    ----------
    primary : `astropy.io.fits.Header`
        Cards of the primary HDU.
    sky : `numpy.ndarray`
        Full-resolution sky level (electrons).
    bin_size : `int`
        Side of a background bin in pixels.

    Returns
    -------
    hdul : `astropy.io.fits.HDUList`
        Primary HDU + binned ``IMAGE``/``MASK``/``VARIANCE`` of the background statistics.
    """
    n = sky.shape[0] // bin_size
    binned = sky[: n * bin_size, : n * bin_size].reshape(n, bin_size, n, bin_size).mean(axis=(1, 3))
    meta = fits.Header()
    meta["HIERARCH ALGORITHM"] = "AKIMA_SPLINE"
    meta["BKGD_X0"], meta["BKGD_Y0"] = 0, 0
    meta["HIERARCH BKGD_WIDTH"] = meta["HIERARCH BKGD_HEIGHT"] = sky.shape[0]
    meta["XBINSIZE"] = meta["YBINSIZE"] = bin_size
    return exposure_hdus(primary, meta, binned, np.zeros((n, n)), binned / bin_size**2)


def hdul_bytes(hdul: fits.HDUList) -> bytes:
    """Serialize an HDU list to bytes.

    Parameters
    ----------
    hdul : `astropy.io.fits.HDUList`
        HDUs to write.

    Returns
    -------
    data : `bytes`
        The FITS file.
    """
    buf = io.BytesIO()
    hdul.writeto(buf, output_verify="silentfix")
    return buf.getvalue()
