"""Map data IDs to path components and back.

Every component the mount shows is made of letters, digits, ``.``, ``_`` and ``-``
only, so that legacy tools accept it verbatim: astromatic tools split file names on
``=``, ``,`` and ``;``; CFITSIO gives ``[ ] ( ) +`` meaning; shells give spaces,
quotes, ``$ * ?`` meaning. Any other character of a value, and a literal ``-x``, is
written as ``-xHH`` (the hex of each UTF-8 byte), which keeps the mapping reversible.

This module knows nothing of the Butler: it works on names and values only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = [
    "DataIdValue",
    "decode_value",
    "dataset_path",
    "dimension_dir",
    "encode_value",
    "file_name",
    "parse_dimension_dir",
]

DataIdValue = int | str

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_ESCAPE = re.compile(r"-x([0-9a-f]{2})")
_PLAIN = re.compile(r"[A-Za-z0-9._-]*")


def _escape_byte(b: int) -> str:
    return f"-x{b:02x}"


def encode_value(value: DataIdValue, *, escape_underscore: bool = False) -> str:
    """Encode a data ID value as a path-safe string.

    Parameters
    ----------
    value : `int` or `str`
        The value; integers are written in decimal.
    escape_underscore : `bool`, optional
        Also escape ``_``; file names need it for every value but the last so
        that ``_``-joined values stay unambiguous.

    Returns
    -------
    encoded : `str`
        Letters, digits, ``.``, ``_`` and ``-`` only.
    """
    # Fast path: a tree of 100k datasets encodes every value; nearly all are plain.
    if type(value) is int:
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and "-x" not in text and not (escape_underscore and "_" in text):
        return text
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "-" and text.startswith("-x", i):
            out.append(_escape_byte(ord("-")))
        elif ch in _SAFE and not (escape_underscore and ch == "_"):
            out.append(ch)
        else:
            out.extend(_escape_byte(b) for b in ch.encode("utf-8"))
        i += 1
    return "".join(out)


def decode_value(text: str, *, as_int: bool = False) -> DataIdValue:
    """Invert `encode_value`.

    Parameters
    ----------
    text : `str`
        An encoded value.
    as_int : `bool`, optional
        Return an `int` (for integer-valued dimensions such as ``visit``).

    Returns
    -------
    value : `int` or `str`
        The original value.

    Raises
    ------
    ValueError
        Raised if ``text`` is not something `encode_value` produces.
    """
    # Fast paths (every lookup parses a name): digits, or safe characters and no escape.
    if as_int and text.isdigit() and text.isascii() and (text == "0" or text[0] != "0"):
        return int(text)
    if not as_int and "-x" not in text and _PLAIN.fullmatch(text):
        return text
    if any(ch not in _SAFE for ch in text):
        raise ValueError(f"not an encoded value: {text!r}")
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(text):
        raw += text[pos : match.start()].encode("ascii")
        raw.append(int(match.group(1), 16))
        pos = match.end()
    raw += text[pos:].encode("ascii")
    decoded = raw.decode("utf-8")
    if encode_value(decoded) != text and encode_value(decoded, escape_underscore=True) != text:
        raise ValueError(f"not a canonical encoded value: {text!r}")
    return int(decoded) if as_int else decoded


def dimension_dir(dimension: str, value: DataIdValue) -> str:
    """Return the directory name for one dimension, e.g. ``visit_733724``."""
    return f"{dimension}_{encode_value(value)}"


def parse_dimension_dir(dimension: str, name: str, *, as_int: bool = False) -> DataIdValue:
    """Return the value a directory name gives ``dimension``.

    Raises
    ------
    ValueError
        Raised if ``name`` is not a directory of this dimension.
    """
    prefix = f"{dimension}_"
    if not name.startswith(prefix):
        raise ValueError(f"{name!r} is not a {dimension} directory")
    return decode_value(name[len(prefix) :], as_int=as_int)


def file_name(
    dataset_type: str,
    values: Sequence[DataIdValue],
    extension: str,
    component: str | None = None,
) -> str:
    """Return the self-describing file name of an artifact.

    Parameters
    ----------
    dataset_type : `str`
        The dataset type name.
    values : `~collections.abc.Sequence` [`int` or `str`]
        The required data ID values in dimension-universe order.
    extension : `str`
        The artifact's extension including its dot (``.fits``, ``.fits.fz``), or empty.
    component : `str`, optional
        The component of a disassembled composite; named like the Butler's
        component dataset types (``calexp.image``).

    Returns
    -------
    name : `str`
        E.g. ``calexp_LSSTCam-imSim_42_733724.fits``: unique among the artifacts of
        a dataset type even when copied into one flat directory.
    """
    head = dataset_type if component is None else f"{dataset_type}.{component}"
    parts = [encode_value(head)]
    last = len(values) - 1
    parts.extend(encode_value(v, escape_underscore=i != last) for i, v in enumerate(values))
    return "_".join(parts) + _safe_extension(extension)


def _safe_extension(extension: str) -> str:
    if not extension:
        return ""
    return "." + encode_value(extension.lstrip("."))


def dataset_path(
    dataset_type: str,
    data_id: Iterable[tuple[str, DataIdValue]],
    extension: str,
    component: str | None = None,
    *,
    flat: bool = False,
) -> str:
    """Return the path of an artifact relative to the mount point.

    Parameters
    ----------
    dataset_type : `str`
        The dataset type name.
    data_id : `~collections.abc.Iterable` [`tuple` [`str`, `int` or `str`]]
        Required dimensions and values, in dimension-universe order.
    extension : `str`
        The artifact's extension including its dot, or empty.
    component : `str`, optional
        The component of a disassembled composite.
    flat : `bool`, optional
        The flat layout: no directory for the last dimension (the file name has its value).

    Returns
    -------
    path : `str`
        E.g. ``calexp/instrument_LSSTCam-imSim/detector_42/visit_733724/calexp_LSSTCam-imSim_42_733724.fits``.
    """
    items = list(data_id)
    dirs = [dimension_dir(dim, value) for dim, value in items]
    if flat:
        dirs = dirs[:-1]
    name = file_name(dataset_type, [value for _, value in items], extension, component)
    return "/".join([encode_value(dataset_type), *dirs, name])
