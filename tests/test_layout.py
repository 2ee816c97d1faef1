"""The path layout: safe for legacy tools, reversible, unique."""

from __future__ import annotations

import random
import re

import pytest

from butlerfs.layout import decode_value, dimension_dir, encode_value, file_name, parse_dimension_dir

SAFE = re.compile(r"^[A-Za-z0-9._-]*$")

TRICKY = [
    "LSSTCam-imSim",
    "u_sim_1.4",
    "SDSSr_65mm~empty",
    "a b",
    "x=1,y=2;z",
    "img[1]",
    "(a)+b",
    "$HOME",
    "*?",
    "'\"",
    "/",
    "..",
    ".",
    ".hidden",
    "-x41",
    "--x",
    "é",
    "日本",
    "",
    "\x00",
    "tab\there",
    0,
    -5,
    733724,
]


@pytest.mark.parametrize("value", TRICKY)
def test_round_trip_and_safe(value):
    encoded = encode_value(value)
    assert SAFE.match(encoded), encoded
    assert decode_value(encoded, as_int=isinstance(value, int)) == value


def test_random_strings_round_trip():
    rng = random.Random(7)
    alphabet = "ab_-.x=,;[]()+ /$*?'\"é\x00"
    for _ in range(2000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        encoded = encode_value(value)
        assert SAFE.match(encoded)
        assert decode_value(encoded) == value
        assert decode_value(encode_value(value, escape_underscore=True)) == value


def test_encoding_is_injective():
    values = ["a-x2db", "a-b", "a_b", "a b", "a-x20b", "-x", "-", "x"]
    encoded = [encode_value(v) for v in values]
    assert len(set(encoded)) == len(values)


@pytest.mark.parametrize("value", ["..", ".", "/", "", ".hidden", "a/../b", "\x00"])
def test_directory_names_cannot_escape(value):
    name = dimension_dir("visit", value)
    assert "/" not in name and "\x00" not in name
    assert name not in (".", "..") and not name.startswith(".")
    assert parse_dimension_dir("visit", name) == value


def test_dimension_dir_round_trip():
    assert dimension_dir("visit", 733724) == "visit_733724"
    assert parse_dimension_dir("visit", "visit_733724", as_int=True) == 733724
    assert dimension_dir("physical_filter", "u_sim_1.4") == "physical_filter_u_sim_1.4"
    with pytest.raises(ValueError):
        parse_dimension_dir("detector", "visit_1")
    with pytest.raises(ValueError):
        decode_value("a b")


def test_file_names():
    assert (
        file_name("calexp", ["LSSTCam-imSim", 42, 733724], ".fits") == "calexp_LSSTCam-imSim_42_733724.fits"
    )
    assert (
        file_name("flat", ["LSSTCam-imSim", 3, "u_sim_1.4"], ".fits") == "flat_LSSTCam-imSim_3_u_sim_1.4.fits"
    )
    assert (
        file_name("calexp", ["LSSTCam-imSim", 1, 2], ".fits", "image")
        == "calexp.image_LSSTCam-imSim_1_2.fits"
    )
    assert file_name("camera", [], ".fits") == "camera.fits"
    assert file_name("raw", ["a", 1], ".fits.fz") == "raw_a_1.fits.fz"


def test_file_names_unique_when_values_hold_underscores():
    # ("a_b", "c") and ("a", "b_c") would collide if underscores in non-last values were kept.
    one = file_name("t", ["a_b", "c"], ".fits")
    two = file_name("t", ["a", "b_c"], ".fits")
    assert one != two
    assert SAFE.match(one) and SAFE.match(two)
