"""Cache directory, download and sha256 verification of pretrained weights.

Contracts:

* A file at its final cache path is only ever put there by an atomic ``os.replace`` after its sha256 matched, so a
  killed or failed download never leaves something that passes for a complete checkpoint. Partial data lives in
  ``<file>.part-<random>`` next to it and is removed on every failure path we get control of (a SIGKILL leaves it;
  the next download sweeps such leftovers once they are :data:`STALE_PART_AGE_S` old).
* A cached file is re-used only if its sha256 matches. The verification is remembered in a ``<file>.sha256`` sidecar
  (digest, size, mtime), so a multi-GB file is re-hashed only when its size or mtime changed. A cached file with the
  wrong digest is reported and downloaded again, never used.
* Network problems (offline, DNS, refused, HTTP errors, timeouts) raise :class:`DownloadError` at once, without
  retries, naming the URL and the exact path where the file can be placed by hand.
* Weights without a known sha256 are refused unless the caller gives a digest or opts in to an unverified download
  (``allow_unverified=True`` or ``CLIP_MODEL_ALLOW_UNVERIFIED=1``).

``file://`` URLs work like ``https://`` ones, which is handy for air-gapped mirrors.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from .errors import ChecksumMismatchError, DownloadError
from .pretrained import PretrainedWeights

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "CLIP_MODEL_CACHE"
ALLOW_UNVERIFIED_ENV_VAR = "CLIP_MODEL_ALLOW_UNVERIFIED"
CACHE_SUBDIR = "clip_model"  # under $XDG_CACHE_HOME or ~/.cache
HASH_CHUNK_BYTES = 1 << 20  # 1 MiB reads when hashing a file on disk
DOWNLOAD_CHUNK_BYTES = 1 << 18  # 256 KiB reads from the network
DEFAULT_TIMEOUT_S = 10.0  # connect timeout, and the longest a read may wait for data
STALE_PART_AGE_S = 10 * 60  # a .part file untouched this long belongs to a dead download
PART_INFIX = ".part-"
SIDECAR_SUFFIX = ".sha256"
USER_AGENT = "clip-search/clip_model (urllib)"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TRUTHY = frozenset({"1", "true", "yes", "on"})


def default_cache_dir() -> Path:
    """``$CLIP_MODEL_CACHE`` if set, else ``$XDG_CACHE_HOME/clip_model``, else ``~/.cache/clip_model``."""
    override = os.environ.get(CACHE_ENV_VAR, "").strip()
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg) / CACHE_SUBDIR
    return Path.home() / ".cache" / CACHE_SUBDIR


def sha256_file(path: Path) -> str:
    """Lowercase hex sha256 of a file, read in :data:`HASH_CHUNK_BYTES` chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(
    weights: PretrainedWeights,
    cache_dir: Path | None = None,
    progress: bool = True,
    *,
    sha256: str | None = None,
    allow_unverified: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Path of ``weights`` in the cache, downloading and verifying them first if needed.

    ``sha256`` supplies a digest for registry entries that have none (it must agree with the registry otherwise).
    Entries with no digest at all are refused unless ``allow_unverified`` or ``$CLIP_MODEL_ALLOW_UNVERIFIED`` is set.
    """
    expected = weights.sha256
    if sha256 is not None:
        sha256 = _normalize_sha256(sha256)
        if expected is not None and sha256 != expected:
            raise ValueError(
                f"sha256 {sha256} given for {weights.name} disagrees with the registry's {expected}; "
                f"use fetch() to download a different file"
            )
        expected = sha256
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / weights.filename
    if expected is None and not _unverified_allowed(allow_unverified):
        raise DownloadError(
            f"No verified sha256 is recorded for {weights.name} ({weights.url}), so it will not be downloaded "
            f"unchecked. Pass sha256=<digest you trust>, or accept an unverified file knowingly with "
            f"allow_unverified=True or {ALLOW_UNVERIFIED_ENV_VAR}=1. Or place the file by hand at {target}."
        )
    return fetch(weights.url, target, expected, progress=progress, timeout=timeout, allow_unverified=True)


def download_tokenizer(
    weights: PretrainedWeights,
    cache_dir: Path | None = None,
    progress: bool = True,
    *,
    allow_unverified: bool = False,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Path:
    """Path of the SentencePiece vocabulary ``weights`` were published with, in the cache, downloading and verifying
    it first if needed (the same rules as :func:`download_weights`). Raises ValueError for weights without one."""
    tokenizer = weights.tokenizer
    if tokenizer is None:
        raise ValueError(f"{weights.name} has no tokenizer file in the registry")
    target = Path(cache_dir if cache_dir is not None else default_cache_dir()) / tokenizer.filename
    if tokenizer.sha256 is None and not _unverified_allowed(allow_unverified):
        raise DownloadError(
            f"No verified sha256 is recorded for the tokenizer of {weights.name} ({tokenizer.url}), so it will not be "
            f"downloaded unchecked. Accept an unverified file knowingly with allow_unverified=True or "
            f"{ALLOW_UNVERIFIED_ENV_VAR}=1, or place the file by hand at {target}."
        )
    return fetch(tokenizer.url, target, tokenizer.sha256, progress=progress, timeout=timeout, allow_unverified=True)


def fetch(
    url: str,
    target: Path,
    sha256: str | None,
    progress: bool = True,
    timeout: float = DEFAULT_TIMEOUT_S,
    *,
    allow_unverified: bool = False,
) -> Path:
    """Make ``target`` a verified copy of ``url`` and return it; reuse it if it already has the right sha256.

    ``sha256=None`` is refused unless ``allow_unverified`` (or ``$CLIP_MODEL_ALLOW_UNVERIFIED``) is set; an
    unverified file already at ``target`` is then used as is. Raises :class:`DownloadError` (network, truncation,
    disk) or :class:`ChecksumMismatchError`; on any error nothing new is left at ``target``. A malformed
    ``sha256`` raises ValueError.
    """
    target = Path(target)
    expected = _normalize_sha256(sha256) if sha256 is not None else None
    if expected is None and not _unverified_allowed(allow_unverified):
        raise DownloadError(
            f"Refusing to download {url} without a sha256 to verify it against. Pass the expected digest, or set "
            f"allow_unverified=True / {ALLOW_UNVERIFIED_ENV_VAR}=1 to accept an unverified file knowingly."
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(
            f"Cannot create the cache directory {target.parent} ({exc}). Set {CACHE_ENV_VAR} to a writable directory."
        ) from exc
    if target.exists() and not target.is_file():
        raise DownloadError(f"{target} exists but is not a regular file; remove it or set {CACHE_ENV_VAR}.")

    if expected is not None:
        if _cached_file_ok(target, expected):
            return target
    elif target.is_file():
        logger.warning("Using %s without verification: no sha256 was given for it.", target)
        return target

    _remove_stale_parts(target)
    _download(url, target, expected, progress=progress, timeout=timeout)
    return target


def _normalize_sha256(sha256: str) -> str:
    value = sha256.strip().lower()
    if not _SHA256_RE.fullmatch(value):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return value


def _unverified_allowed(allow_unverified: bool) -> bool:
    return allow_unverified or os.environ.get(ALLOW_UNVERIFIED_ENV_VAR, "").strip().lower() in _TRUTHY


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + SIDECAR_SUFFIX)


def _read_sidecar(target: Path, stat: os.stat_result) -> str | None:
    """The digest the sidecar records, if the sidecar exists and still describes this file's size and mtime."""
    try:
        record = json.loads(_sidecar(target).read_text(encoding="utf-8"))
        if record["size"] == stat.st_size and record["mtime_ns"] == stat.st_mtime_ns:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _write_sidecar(target: Path, digest: str) -> None:
    """Record that ``target`` (as it is now) has ``digest``; best effort, e.g. a read-only cache just re-hashes."""
    sidecar = _sidecar(target)
    tmp = sidecar.with_name(f"{sidecar.name}{PART_INFIX}{secrets.token_hex(8)}")
    try:
        stat = target.stat()
        record = {"sha256": digest, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        tmp.write_text(json.dumps(record) + "\n", encoding="utf-8")
        os.replace(tmp, sidecar)
    except OSError as exc:
        logger.debug("Could not write %s (%s); the file will be re-hashed next time.", sidecar, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _cached_file_ok(target: Path, expected: str) -> bool:
    """True if ``target`` exists with sha256 ``expected``; a mismatching file is reported (and later replaced)."""
    try:
        stat = target.stat()
    except FileNotFoundError:
        return False
    recorded = _read_sidecar(target, stat)
    if recorded == expected:
        logger.debug("%s verified earlier (sidecar matches size and mtime).", target)
        return True
    actual = recorded if recorded is not None else sha256_file(target)
    if actual == expected:
        _write_sidecar(target, actual)
        logger.debug("%s verified (sha256 %s).", target, actual)
        return True
    logger.warning(
        "Cached file %s has sha256 %s but %s is expected (corrupt or outdated); downloading it again.",
        target,
        actual,
        expected,
    )
    return False


def _remove_stale_parts(target: Path) -> None:
    """Delete ``<target>.part-*`` files left by downloads that died; recent ones may belong to a live download."""
    cutoff = time.time() - STALE_PART_AGE_S
    for part in target.parent.glob(f"{glob.escape(target.name)}{PART_INFIX}*"):
        with contextlib.suppress(OSError):
            if part.is_file() and part.stat().st_mtime < cutoff:
                part.unlink()
                logger.info("Removed %s, left behind by an interrupted download.", part)


def _manual_hint(url: str, target: Path, expected: str | None) -> str:
    digest = f" (sha256 {expected})" if expected is not None else ""
    return (
        f"To install it by hand, download {url} elsewhere and place it at {target}{digest}. "
        f"Set {CACHE_ENV_VAR} to use a different cache directory."
    )


def _download(url: str, target: Path, expected: str | None, *, progress: bool, timeout: float) -> None:
    """Stream ``url`` into a temp file beside ``target``, verify, then atomically move it into place."""
    part = target.with_name(f"{target.name}{PART_INFIX}{secrets.token_hex(8)}")
    logger.info("Downloading %s to %s", url, target)
    try:
        try:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        except OSError as exc:
            raise DownloadError(f"Cannot write to {target.parent} ({exc}). Set {CACHE_ENV_VAR}.") from exc
        with os.fdopen(fd, "wb") as out:
            actual = _stream(url, out, target, expected, progress=progress, timeout=timeout)
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and actual != expected:
            raise ChecksumMismatchError(
                f"sha256 mismatch for {url}: expected {expected}, got {actual}. The download was discarded; "
                f"nothing was saved at {target}."
            )
        _sidecar(target).unlink(missing_ok=True)
        os.replace(part, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise DownloadError(f"Could not save {url} to {target}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            part.unlink(missing_ok=True)
    if expected is not None:
        _write_sidecar(target, actual)
        logger.info("Saved %s (sha256 verified).", target)
    else:
        logger.warning(
            "Saved %s WITHOUT verification; its sha256 is %s. Pin it to verify future downloads.", target, actual
        )


def _stream(url: str, out: BinaryIO, target: Path, expected: str | None, *, progress: bool, timeout: float) -> str:
    """Copy the body of ``url`` into ``out``; return its sha256. Raises DownloadError on any transfer problem."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DownloadError(
            f"Could not download {url}: HTTP {exc.code} {exc.reason}. {_manual_hint(url, target, expected)}"
        ) from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        remote = "" if url.startswith("file:") else " (offline, or the server is unreachable)"
        raise DownloadError(
            f"Could not download {url}: {reason}{remote}. {_manual_hint(url, target, expected)}"
        ) from exc

    with response:
        length = _content_length(response)
        if length is not None:
            _check_free_space(target.parent, length)
        digest = hashlib.sha256()
        received = 0
        with tqdm(
            total=length, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name, disable=not progress
        ) as bar:
            while True:
                try:
                    chunk = response.read(DOWNLOAD_CHUNK_BYTES)
                except (OSError, http.client.HTTPException) as exc:
                    raise DownloadError(
                        f"Download of {url} broke off after {received} bytes ({exc!r}). Nothing was saved at "
                        f"{target}; try again. {_manual_hint(url, target, expected)}"
                    ) from exc
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if length is not None and received != length:
        raise DownloadError(
            f"Download of {url} was truncated: got {received} of {length} bytes before the connection closed. "
            f"Nothing was saved at {target}; try again. {_manual_hint(url, target, expected)}"
        )
    return digest.hexdigest()


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        length = int(value) if value is not None else None
    except ValueError:
        return None
    return length if length is not None and length >= 0 else None


def _check_free_space(directory: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free < needed:
        raise DownloadError(
            f"Not enough disk space in {directory}: the download needs {needed} bytes, {free} are free. "
            f"Free some space or set {CACHE_ENV_VAR} to another directory."
        )


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (POSIX); platforms that cannot open a directory skip this."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
