"""The stored form of a file path: lossless for any name the OS allows, valid UTF-8, refused when malformed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from indexer import paths

# A POSIX name: any bytes but "/" and NUL; a path: up to four such names joined by "/".
NAME_BYTES = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b"\0" not in b)
NAMES = NAME_BYTES.filter(lambda b: b not in (b".", b".."))
RELATIVE_BYTES = st.lists(NAMES, min_size=1, max_size=4).map(b"/".join)


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        (b"plain.jpg", "plain.jpg"),
        (b"a\\b.png", "a\\\\b.png"),
        (b"caf\xe9.png", "caf\\xe9.png"),  # Latin-1 e-acute: not UTF-8
        ("café.png".encode(), "café.png"),  # valid UTF-8 is stored as it is
        (b"line\nbreak.jpg", "line\nbreak.jpg"),
        (b"\\xe9.png", "\\\\xe9.png"),  # a literal backslash-x is not an escape
        (b"\xed\xa0\x80.png", "\\xed\\xa0\\x80.png"),  # a UTF-8-encoded surrogate is not valid UTF-8
        (b"dir/sub/x.jpg", "dir/sub/x.jpg"),
    ],
)
def test_known_names_have_their_stored_form(name: bytes, stored: str) -> None:
    assert paths.to_stored(os.fsdecode(name)) == stored
    assert paths.check_stored(stored) == stored
    assert paths.stored_bytes(stored) == name


@given(RELATIVE_BYTES)
def test_any_byte_path_round_trips_through_valid_utf8(relative: bytes) -> None:
    stored = paths.to_stored(os.fsdecode(relative))
    stored.encode("utf-8")  # raises if a surrogate is left: SQLite, JSON and HTML could not hold it
    assert paths.check_stored(stored) == stored
    assert paths.stored_bytes(stored) == relative
    assert paths.file_path(Path("/root"), stored) == Path("/root") / os.fsdecode(relative)


@given(st.text(min_size=1, max_size=30).filter(lambda s: "\0" not in s and "/" not in s and s not in (".", "..")))
def test_any_str_name_has_a_stored_form_including_lone_surrogates(name: str) -> None:
    stored = paths.to_stored(name)
    stored.encode("utf-8")
    assert paths.from_stored(stored) == name
    assert paths.check_stored(stored) == stored


@given(RELATIVE_BYTES, RELATIVE_BYTES)
def test_different_names_have_different_stored_forms(first: bytes, second: bytes) -> None:
    assert (paths.to_stored(os.fsdecode(first)) == paths.to_stored(os.fsdecode(second))) == (first == second)


def test_names_that_differ_only_by_unicode_normalization_stay_two() -> None:
    nfc, nfd = "caf\u00e9.jpg", "cafe\u0301.jpg"
    assert paths.to_stored(nfc) == nfc and paths.to_stored(nfd) == nfd
    assert paths.stored_bytes(nfc) != paths.stored_bytes(nfd)


def test_a_lone_surrogate_that_is_no_byte_is_stored_as_a_u_escape() -> None:
    assert paths.to_stored("x\ud800y\udfff") == "x\\ud800y\\udfff"
    assert paths.from_stored("x\\ud800y\\udfff") == "x\ud800y\udfff"


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "/abs.jpg",
        "a/../b.jpg",
        "./a.jpg",
        "a//b.jpg",
        "a/",
        "..",
        "back\\slash.jpg",  # a single backslash starts no escape
        "trailing\\",
        "\\x41.jpg",  # an ASCII byte is never escaped
        "\\xE9.jpg",  # escapes are lowercase
        "\\x9",
        "\\u0041.jpg",  # not a surrogate
        "\\udce9.jpg",  # a byte surrogate is stored as \xNN
        "raw\udce9.jpg",  # not UTF-8
        "nul\0.jpg",
    ],
)
def test_invalid_stored_paths_are_refused(stored: str) -> None:
    with pytest.raises(ValueError, match="image paths must be"):
        paths.check_stored(stored)


def test_display_is_one_printable_line() -> None:
    assert paths.display("a\nb\tc\r.jpg") == "a\\nb\\tc\\r.jpg"
    assert paths.display("caf\\xe9 photo.png") == "caf\\xe9 photo.png"
    assert paths.display("rtl\u202egpj.exe") == "rtl\\u202egpj.exe"  # no bidi override reaches the terminal
    assert paths.display("café.jpg") == "café.jpg"
    for name in ("x\n.jpg", "x\u2028y.jpg", "x\x85.jpg", "x\x1b[2J.jpg"):
        shown = paths.display(paths.to_stored(name))
        assert shown.isprintable() and len(shown.splitlines()) == 1
