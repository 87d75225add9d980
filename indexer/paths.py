"""How a file's path is stored in the catalog: any name the operating system allows, losslessly, as valid text.

A POSIX file name is a sequence of bytes other than "/" and NUL; Python presents the bytes that are not UTF-8 as
lone surrogates (``os.fsdecode``'s surrogateescape, U+DC80..U+DCFF), which SQLite, JSON and HTML cannot hold. The
stored form is the relative POSIX path with these escapes, so it is valid UTF-8, reads as the name itself in the
usual case, and maps back to the exact bytes:

* a backslash is stored as two backslashes (``a\\b.png`` -> ``a\\\\b.png``);
* a byte that is not part of valid UTF-8 is stored as ``\\xNN`` (two lowercase hex digits);
* any other lone surrogate (not from POSIX, where ``os.fsdecode`` only makes U+DC80..U+DCFF, but Windows names can
  hold unpaired UTF-16 surrogates) is stored as ``\\uNNNN`` (four lowercase hex digits).

Everything else (newlines, other control characters, any Unicode, in whatever normalization form the file system
returned) is stored as it is: two names that differ only by Unicode normalization are two files, and stay two.
So every str without NUL has exactly one stored form (:func:`to_stored` is total and injective, the scan never
meets a name it cannot store), and :func:`from_stored` gives that str back.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ESCAPE = "\\"
_ESCAPED = re.compile("[\\\\\ud800-\udfff]")
_STORED_ESCAPES = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})?")
_BYTE_SURROGATES = range(0xDC80, 0xDD00)  # where os.fsdecode's surrogateescape puts the bytes 0x80..0xff
_SURROGATES = range(0xD800, 0xE000)
_RAW_SURROGATE = re.compile("[\ud800-\udfff]")


def to_stored(relative: str) -> str:
    """The stored form of ``relative`` (a POSIX path relative to the image root, as ``os.fsdecode`` gives it)."""

    def escape(match: re.Match[str]) -> str:
        code = ord(match.group())
        if code == ord(ESCAPE):
            return ESCAPE * 2
        if code in _BYTE_SURROGATES:
            return f"\\x{code - 0xDC00:02x}"
        return f"\\u{code:04x}"

    return _ESCAPED.sub(escape, relative)


def from_stored(stored: str) -> str:
    """The inverse of :func:`to_stored`: the str the ``os`` functions take for the file (surrogateescape).

    Raises ValueError on a backslash that starts no escape, or on an escape :func:`to_stored` never writes
    (``\\xNN`` below 0x80, ``\\uNNNN`` that is not a surrogate or is one ``\\xNN`` stands for)."""

    def unescape(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape is None:
            raise ValueError(f"stored path {stored!r} has a backslash that starts no escape")
        if escape == ESCAPE:
            return ESCAPE
        code = int(escape[1:], 16)
        if escape[0] == "x":
            if code < 0x80:
                raise ValueError(f"stored path {stored!r} escapes the ASCII byte {code:#04x}")
            return chr(0xDC00 + code)
        if code not in _SURROGATES or code in _BYTE_SURROGATES:
            raise ValueError(f"stored path {stored!r} escapes U+{code:04X}, which is stored as itself or as \\xNN")
        return chr(code)

    return _STORED_ESCAPES.sub(unescape, stored)


def check_stored(stored: str) -> str:
    """``stored`` if it is a valid stored path: valid UTF-8 (no lone surrogate), not empty, relative, no "." / ".."
    / empty segment, escapes valid; else ValueError."""
    if _RAW_SURROGATE.search(stored):
        raise ValueError(f"image paths must be stored paths relative to the image root (valid UTF-8), got {stored!r}")
    try:
        relative = from_stored(stored)
    except ValueError as exc:
        raise ValueError(f"image paths must be stored paths relative to the image root: {exc}") from None
    parts = relative.split("/")
    if not stored or relative.startswith("/") or "\0" in relative or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"image paths must be POSIX paths relative to the image root without '..', got {stored!r}")
    return stored


def file_path(root: Path, stored: str) -> Path:
    """The file a stored path names under ``root``."""
    return Path(root) / from_stored(stored)


def stored_bytes(stored: str) -> bytes:
    """The exact bytes of the file name (what ``os.fsencode`` gives for the path on disk)."""
    return os.fsencode(from_stored(stored))


def display(stored: str) -> str:
    """One line of text for logs and terminal listings: control characters (newline, tab, ...) shown as escapes."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in stored)
