"""Folder scan: a bounded-memory ``os.scandir`` generator of the image files under a root, in a deterministic order.

Contract of ``iter_images(root)``:

- Order: within each directory entries are sorted by name (code point order) and directories are descended where
  they sort, so the output is sorted by the tuple of path components and identical across runs of the same tree.
- Paths are POSIX strings relative to ``root``; ``size`` and ``mtime_ns`` come from one ``stat`` per file.
- Extensions match case-insensitively (``IMG.JPG`` is a "jpg").
- Hidden names (starting with ".") are skipped, files and directories alike, unless ``skip_hidden=False``.
- Symlinks: a symlink to a directory is never followed (no loops, no escaping the root); a symlink to a file is
  included (with the target's size and mtime) only if its target resolves inside the resolved root.
- ``exclude`` glob patterns, case-sensitive:
  - a pattern without "/" (``*.tmp``, ``@eaDir``) matches the name of a file or directory at any depth;
  - a pattern with "/" matches the whole relative path (a leading "/" is ignored): ``*`` and ``?`` never cross
    "/", ``[...]`` is a character class (``[!...]`` negated), a ``**`` segment matches zero or more directories,
    and a trailing ``/**`` also matches the directory itself (``**/@eaDir/**`` skips every ``@eaDir``);
  - a trailing "/" (``cache/``) restricts a pattern to directories;
  - a matching directory is skipped with everything inside it (``thumbs/*`` skips ``thumbs/a.jpg`` and
    ``thumbs/small/b.jpg``).
- A directory that cannot be listed (permission denied, removed mid-scan) is logged, passed to ``on_error`` with its
  relative path and skipped; the root itself must exist and be listable (its errors propagate).
  Callers that delete index rows for files the scan did not see must spare the paths under those directories.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import features

logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif"})
AVIF_EXTENSIONS = frozenset({"avif"})
# Only scanned (and decodable) when the optional pillow-heif package is installed: see enable_heif.
HEIF_EXTENSIONS = frozenset({"heic", "heif"})
HIDDEN_PREFIX = "."

ScanErrorHandler = Callable[[str, OSError], None]


@dataclass(frozen=True)
class ScannedFile:
    """One image file found by the scan: ``path`` is POSIX and relative to the root; ``mtime_ns`` is st_mtime_ns."""

    path: str
    size: int
    mtime_ns: int


@cache
def enable_heif() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow once per process; False if the package is missing."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


@cache
def supported_extensions() -> frozenset[str]:
    """``DEFAULT_EXTENSIONS`` less "avif" if Pillow cannot decode it, plus ``HEIF_EXTENSIONS`` with pillow-heif."""
    extensions = DEFAULT_EXTENSIONS
    if not features.check("avif"):
        logger.info("this Pillow build cannot decode AVIF: .avif files are not indexed")
        extensions -= AVIF_EXTENSIONS
    if enable_heif():
        extensions |= HEIF_EXTENSIONS
    return extensions


def _glob_segment_regex(segment: str) -> str:
    """Regex for one path segment of a glob: ``*`` -> ``[^/]*``, ``?`` -> ``[^/]``, ``[...]`` kept as a class."""
    out: list[str] = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            while segment[i + 1 : i + 2] == "*":
                i += 1
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and (end := _class_end(segment, i)) > 0:
            body = segment[i + 1 : end]
            negate = body[0] in "!^"
            body = "".join("\\" + c if c in "\\[]^" else c for c in (body[1:] if negate else body))
            out.append(f"(?!/)[^{body}]" if negate else f"[{body}]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _class_end(segment: str, start: int) -> int:
    """Index of the "]" closing the class opened at ``start`` ("]" right after "[" or "[!" is literal), or -1."""
    i = start + 1
    if segment[i : i + 1] in ("!", "^"):
        i += 1
    if segment[i : i + 1] == "]":
        i += 1
    return segment.find("]", i)


def _glob_path_regex(pattern: str) -> str:
    """Regex for a "/"-separated glob matched against a whole relative path (see the module docstring)."""
    segments = pattern.strip("/").split("/")
    out: list[str] = []
    need_separator = False
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            if last:
                out.append("(?:/.*)?" if need_separator else ".*")
            else:
                out.append("(?:/[^/]+)*/" if need_separator else "(?:[^/]+/)*")
                need_separator = False
            continue
        if need_separator:
            out.append("/")
        out.append(_glob_segment_regex(segment))
        need_separator = True
    return "".join(out)


@dataclass(frozen=True)
class _Excluder:
    """Compiled ``exclude`` patterns: name patterns, path patterns, each split by "applies to directories only"."""

    name_any: re.Pattern[str] | None
    name_dir: re.Pattern[str] | None
    path_any: re.Pattern[str] | None
    path_dir: re.Pattern[str] | None

    @classmethod
    def compile(cls, patterns: Sequence[str]) -> _Excluder:
        groups: dict[tuple[bool, bool], list[str]] = {(n, d): [] for n in (True, False) for d in (True, False)}
        for pattern in patterns:
            if not pattern.strip("/"):
                raise ValueError(f"empty exclude pattern: {pattern!r}")
            dir_only = pattern.endswith("/")
            body = pattern.rstrip("/")
            is_name = "/" not in body
            groups[is_name, dir_only].append(_glob_segment_regex(body) if is_name else _glob_path_regex(body))

        def join(regexes: list[str]) -> re.Pattern[str] | None:
            return re.compile("|".join(f"(?:{r})" for r in regexes)) if regexes else None

        name_any, name_dir = join(groups[True, False]), join(groups[True, True])
        return cls(name_any, name_dir, join(groups[False, False]), join(groups[False, True]))

    def excludes(self, name: str, relative: str, is_dir: bool) -> bool:
        checks = [(self.name_any, name), (self.path_any, relative)]
        if is_dir:
            checks += [(self.name_dir, name), (self.path_dir, relative)]
        return any(regex is not None and regex.fullmatch(text) is not None for regex, text in checks)


def iter_images(
    root: Path,
    extensions: frozenset[str] | None = None,
    exclude: Sequence[str] = (),
    skip_hidden: bool = True,
    on_error: ScanErrorHandler | None = None,
) -> Iterator[ScannedFile]:
    """Yield the image files under ``root`` (recursively), by the rules of the module docstring.

    Args:
        root: the image folder.
        extensions: extensions to keep (any case, a leading dot ignored); None means ``supported_extensions()``.
        exclude: glob patterns (module docstring) for files and directories to skip.
        skip_hidden: skip names starting with ".".
        on_error: called with (relative POSIX directory path, error) for each directory that cannot be listed.

    Raises FileNotFoundError or NotADirectoryError for a bad root, PermissionError if the root cannot be listed.
    """
    if not root.exists():
        raise FileNotFoundError(f"image folder does not exist: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"image folder is not a directory: {root}")
    wanted = frozenset(e.lower().lstrip(".") for e in (supported_extensions() if extensions is None else extensions))
    excluder = _Excluder.compile(exclude) if exclude else None
    real_root = os.path.realpath(root)
    root_entries = _sorted_entries(os.fspath(root))  # the root's own errors propagate
    stack: list[tuple[str, Iterator[os.DirEntry[str]]]] = [("", iter(root_entries))]
    while stack:
        prefix, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name = entry.name
        if skip_hidden and name.startswith(HIDDEN_PREFIX):
            continue
        relative = prefix + name
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError:
            continue
        if is_dir:
            if excluder is not None and excluder.excludes(name, relative, is_dir=True):
                continue
            try:
                children = _sorted_entries(entry.path)
            except OSError as exc:
                logger.warning("cannot list %s, skipping it: %s", entry.path, exc)
                if on_error is not None:
                    on_error(relative, exc)
                continue
            stack.append((relative + "/", iter(children)))
            continue
        if extension_of(name) not in wanted:
            continue
        if excluder is not None and excluder.excludes(name, relative, is_dir=False):
            continue
        scanned = _scan_file(entry, relative, real_root)
        if scanned is not None:
            yield scanned


def extension_of(name: str) -> str:
    """Lowercase extension without the dot ("IMG.JPG" -> "jpg"); "" when the name has no dot."""
    _, dot, extension = name.rpartition(".")
    return extension.lower() if dot else ""


def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as iterator:
        return sorted(iterator, key=lambda e: e.name)


def _scan_file(entry: os.DirEntry[str], relative: str, real_root: str) -> ScannedFile | None:
    """Stat a candidate file; None for non-regular files, vanished files and symlinks leaving the root."""
    try:
        if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if os.path.commonpath((real_root, target)) != real_root:
                logger.debug("skipping %s: symlink target %s is outside the folder", entry.path, target)
                return None
            if not entry.is_file(follow_symlinks=True):
                return None
            stat = entry.stat(follow_symlinks=True)
        elif entry.is_file(follow_symlinks=False):
            stat = entry.stat(follow_symlinks=False)
        else:
            return None
    except (OSError, ValueError) as exc:  # vanished since listed, broken link; ValueError: paths on different drives
        logger.debug("skipping %s: %s", entry.path, exc)
        return None
    return ScannedFile(path=relative, size=stat.st_size, mtime_ns=stat.st_mtime_ns)
