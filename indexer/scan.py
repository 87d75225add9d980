"""Folder scan: a bounded-memory ``os.scandir`` generator of the image files under a root, in a deterministic order.

Contract of ``iter_images(root)``:

- Order: within each directory entries are sorted by name (code point order of ``os.fsdecode``'s str) and
  directories are descended where they sort, so the output is sorted by the tuple of path components and identical
  across runs of the same tree.
- Paths are in the stored form of :mod:`indexer.paths` (the POSIX path relative to ``root``, a backslash and each
  byte that is not UTF-8 escaped): any name the OS allows is yielded, and ``paths.file_path(root, path)`` opens it.
  ``size`` and ``mtime_ns`` come from one ``stat`` per file.
- Extensions match case-insensitively (``IMG.JPG`` is a "jpg").
- Hidden names (starting with ".") are skipped, files and directories alike, unless ``skip_hidden=False``.
- Symlinks: a symlink to a directory is never followed (no loops, no escaping the root); a symlink to a file is
  included (with the target's size and mtime) only if its target resolves inside the resolved root.
- Passed over: an entry that looks like an image (wanted extension, not hidden, not excluded) but is not yielded is
  passed to ``on_skip`` as a ``PassedOver`` with its reason (``PASSED_OVER_CATEGORIES``): a symlink outside the
  folder, dangling or in a loop; a FIFO, socket, device or directory (a directory is still descended); an entry
  that vanished or could not be stat'ed; any other error examining it. One entry never stops the scan.
- ``exclude`` glob patterns, case-sensitive, matched against the names as ``os.fsdecode`` gives them (not the
  stored form):
  - a pattern without "/" (``*.tmp``, ``@eaDir``) matches the name of a file or directory at any depth;
  - a pattern with "/" matches the whole relative path (a leading "/" is ignored): ``*`` and ``?`` never cross
    "/", ``[...]`` is a character class (``[!...]`` negated), a ``**`` segment matches zero or more directories,
    and a trailing ``/**`` also matches the directory itself (``**/@eaDir/**`` skips every ``@eaDir``);
  - a trailing "/" (``cache/``) restricts a pattern to directories;
  - a matching directory is skipped with everything inside it (``thumbs/*`` skips ``thumbs/a.jpg`` and
    ``thumbs/small/b.jpg``).
- A directory that cannot be listed (permission denied, removed mid-scan) is logged, passed to ``on_error`` with its
  stored path and skipped; the root itself must exist and be listable (its errors propagate).
  Callers that delete index rows for files the scan did not see must spare the paths under those directories.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from PIL import features

from . import paths

logger = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif"})
AVIF_EXTENSIONS = frozenset({"avif"})
# Only scanned (and decodable) when the optional pillow-heif package is installed: see enable_heif.
HEIF_EXTENSIONS = frozenset({"heic", "heif"})
HIDDEN_PREFIX = "."

PASSED_OVER_CATEGORIES = (
    "symlink outside the folder",
    "dangling symlink",
    "symlink loop",
    "not a regular file",
    "missing",
    "unreadable",
)


@dataclass(frozen=True)
class ScannedFile:
    """One image file found by the scan: ``path`` is in the stored form of :mod:`indexer.paths` (relative to the
    root); ``size`` and ``mtime_ns`` (st_mtime_ns) are the file's, a symlink's target's for a symlink."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class PassedOver:
    """An entry that looks like an image but is not yielded: ``path`` in the stored form; ``size``/``mtime_ns`` from
    the entry's own ``lstat`` (0 when it failed); ``reason`` starts with one of ``PASSED_OVER_CATEGORIES`` and ": "."""

    path: str
    size: int
    mtime_ns: int
    reason: str


_KINDS: tuple[tuple[Callable[[int], bool], str], ...] = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISLNK, "a symlink"),
)

ScanErrorHandler = Callable[[str, OSError], None]
SkipHandler = Callable[[PassedOver], None]


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
    on_skip: SkipHandler | None = None,
) -> Iterator[ScannedFile]:
    """Yield the image files under ``root`` (recursively), by the rules of the module docstring.

    Args:
        root: the image folder.
        extensions: extensions to keep (any case, a leading dot ignored); None means ``supported_extensions()``.
        exclude: glob patterns (module docstring) for files and directories to skip.
        skip_hidden: skip names starting with ".".
        on_error: called with (directory path in the stored form, error) for each directory that cannot be listed.
        on_skip: called with each ``PassedOver`` entry, in scan order, before the scan goes on.

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
        relative, is_dir, candidate = prefix + name, _is_directory(entry), extension_of(name) in wanted
        if (is_dir or candidate) and excluder is not None and excluder.excludes(name, relative, is_dir):
            continue
        if candidate:  # looks like an image: yielded, or passed over with a reason
            found = _examined(entry, paths.to_stored(relative), real_root)
            if isinstance(found, ScannedFile):
                yield found
            else:
                logger.debug("passing over %s: %s", paths.display(found.path), found.reason)
                if on_skip is not None:
                    on_skip(found)
        if is_dir and (children := _listed(entry, relative, on_error)) is not None:
            stack.append((relative + "/", iter(children)))


def extension_of(name: str) -> str:
    """Lowercase extension without the dot ("IMG.JPG" -> "jpg"); "" when the name has no dot."""
    _, dot, extension = name.rpartition(".")
    return extension.lower() if dot else ""


def _sorted_entries(path: str) -> list[os.DirEntry[str]]:
    with os.scandir(path) as iterator:
        return sorted(iterator, key=lambda e: e.name)


def _is_directory(entry: os.DirEntry[str]) -> bool:
    """Whether ``entry`` is a directory itself (a symlink to one is not); False when that cannot be told."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:  # examined as a file then: its lstat says what went wrong
        return False


def _listed(entry: os.DirEntry[str], relative: str, on_error: ScanErrorHandler | None) -> list[os.DirEntry[str]] | None:
    """The sorted entries of a subdirectory, or None (logged, passed to ``on_error``) when it cannot be listed."""
    try:
        return _sorted_entries(entry.path)
    except OSError as exc:
        logger.warning("cannot list %s, skipping it: %s", paths.display(paths.to_stored(entry.path)), exc)
        if on_error is not None:
            on_error(paths.to_stored(relative), exc)
        return None


def _examined(entry: os.DirEntry[str], stored: str, real_root: str) -> ScannedFile | PassedOver:
    """``_examine``, where any error is this entry's: the per-file skip boundary of the scan."""
    try:
        return _examine(entry, stored, real_root)
    except Exception as exc:  # one entry never stops the scan
        logger.warning("passing over %s: examining it failed", paths.display(stored), exc_info=True)
        return PassedOver(stored, 0, 0, f"unreadable: {type(exc).__name__}: {exc}")


def _examine(entry: os.DirEntry[str], stored: str, real_root: str) -> ScannedFile | PassedOver:
    """One ``lstat`` of a candidate entry: a regular file is scanned, a symlink followed, anything else passed over."""
    try:
        own = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return PassedOver(stored, 0, 0, "missing: it disappeared while the folder was scanned")
    except OSError as exc:
        return PassedOver(stored, 0, 0, f"unreadable: {exc.strerror or exc}")
    if stat.S_ISREG(own.st_mode):
        return ScannedFile(stored, own.st_size, own.st_mtime_ns)
    if stat.S_ISLNK(own.st_mode):
        return _follow(entry.path, stored, real_root, own)
    return PassedOver(stored, own.st_size, own.st_mtime_ns, f"not a regular file: {_kind(own.st_mode)}")


def _follow(path: str, stored: str, real_root: str, link: os.stat_result) -> ScannedFile | PassedOver:
    """A symlink: scanned with its target's size and mtime if that is a regular file inside the root."""
    resolved = os.path.realpath(path)  # as far as it resolves: never raises for loops or dangling links
    shown = paths.display(paths.to_stored(resolved))
    try:
        target = os.stat(path)  # follows the whole chain
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            reason = "symlink loop: following it never reaches a file"
        elif exc.errno in (errno.ENOENT, errno.ENOTDIR):
            reason = f"dangling symlink: its target {shown} does not exist"
        else:
            reason = f"unreadable: {exc.strerror or exc}"
        return PassedOver(stored, link.st_size, link.st_mtime_ns, reason)
    if not _is_inside(real_root, resolved):
        return PassedOver(stored, link.st_size, link.st_mtime_ns, f"symlink outside the folder: it points to {shown}")
    if not stat.S_ISREG(target.st_mode):
        return PassedOver(
            stored, link.st_size, link.st_mtime_ns, f"not a regular file: a symlink to {_kind(target.st_mode)}"
        )
    return ScannedFile(stored, target.st_size, target.st_mtime_ns)


def _is_inside(real_root: str, resolved: str) -> bool:
    try:
        return os.path.commonpath((real_root, resolved)) == real_root
    except ValueError:  # paths on different drives
        return False


def _kind(mode: int) -> str:
    """What a non-regular file is, for a reason ("a FIFO")."""
    return next((name for test, name in _KINDS if test(mode)), f"a file of type {stat.S_IFMT(mode):#o}")
