"""How a file's path is stored in the catalog: any name the operating system allows, losslessly, as valid text.

A POSIX file name is a sequence of bytes other than "/" and NUL; Python presents the bytes that are not UTF-8 as
lone surrogates (``os.fsdecode``'s surrogateescape, U+DC80..U+DCFF), which SQLite, JSON and HTML cannot hold. The
stored form is the relative POSIX path with two escapes, so it is valid UTF-8, reads as the name itself in the
usual case, and maps back to the exact bytes:

* a backslash is stored as two backslashes (``a\\b.png`` -> ``a\\\\b.png``);
* a byte that is not part of valid UTF-8 is stored as ``\\xNN`` (two lowercase hex digits).

Everything else (newlines, other control characters, any Unicode, in whatever normalization form the file system
returned) is stored as it is: two names that differ only by Unicode normalization are two files, and stay two.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ESCAPE = "\\"
_SURROGATE_ESCAPES = re.compile("[\\\\\udc80-\udcff]")
_STORED_ESCAPES = re.compile(r"\\(\\|x[0-9a-f]{2})?")


def to_stored(relative: str) -> str:
    """The stored form of ``relative`` (a POSIX path relative to the image root, as ``os.fsdecode`` gives it)."""

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        return ESCAPE * 2 if char == ESCAPE else f"\\x{ord(char) - 0xDC00:02x}"

    return _SURROGATE_ESCAPES.sub(escape, relative)


def from_stored(stored: str) -> str:
    """The inverse of :func:`to_stored`: the str the ``os`` functions take for the file (surrogateescape).

    Raises ValueError on a backslash that starts no escape, or on ``\\xNN`` below 0x80 (never written)."""

    def unescape(match: re.Match[str]) -> str:
        escape = match.group(1)
        if escape is None:
            raise ValueError(f"stored path {stored!r} has a backslash that starts no escape")
        if escape == ESCAPE:
            return ESCAPE
        byte = int(escape[1:], 16)
        if byte < 0x80:
            raise ValueError(f"stored path {stored!r} escapes the ASCII byte {byte:#04x}")
        return chr(0xDC00 + byte)

    return _STORED_ESCAPES.sub(unescape, stored)


def check_stored(stored: str) -> str:
    """``stored`` if it is a valid stored path: not empty, relative, no "." / ".." / empty segment, escapes valid;
    else ValueError."""
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
