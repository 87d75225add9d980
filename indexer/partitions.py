"""Deterministic partitions of a folder's work list: the units that ``clip-index encode`` writes, one shard each.

The work list is what a run must write: the files to decode (:class:`~indexer.scan.ScannedFile`) and the entries
the scan passed over with a reason (:class:`~indexer.scan.PassedOver`), each under its stored path
(:mod:`indexer.paths`). :func:`split` cuts it by this rule, the same on every run and machine:

* Entries are taken in code point order of their stored paths.
* A partition ends after an entry when it holds ``2 * size`` entries (the most a partition holds), or when it holds
  at least ``half = ceil(size / 2)`` and the entry is a *cut point*: the first 8 bytes of the BLAKE2b digest of its
  stored path (UTF-8), read as a big-endian integer, are divisible by ``half``. After the first ``half`` entries
  each entry ends the partition with probability ``1 / half``, so partitions hold about ``size`` entries.
* Whether an entry is a cut point depends on its path alone, so adding or removing a file changes the partitions
  around it and leaves the others as they were: a rerun over a folder that changed since the interrupted run still
  finds most of its partitions finished.
* A partition's name is the first :data:`NAME_HEX_DIGITS` hex digits of the SHA-256 of its entries, in order,
  each as a line holding the JSON array [stored path, size, mtime_ns, the scan's reason or ""]. The same entries
  give the same name; a partition whose entries differ in any way gets another one, so a shard never stands for an
  older version of its files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass

from .scan import PassedOver, ScannedFile

NAME_HEX_DIGITS = 24  # 96 bits of SHA-256: no two partitions of any collection share a name by chance
CUT_DIGEST_BYTES = 8  # bytes of BLAKE2b read to decide a cut point
MAX_FACTOR = 2  # a partition holds at most MAX_FACTOR * size entries

Entry = ScannedFile | PassedOver


@dataclass(frozen=True)
class Partition:
    """One partition of the work list: ``files`` to decode and ``passed`` entries written with the scan's reason,
    each in stored path order."""

    name: str
    files: tuple[ScannedFile, ...]
    passed: tuple[PassedOver, ...]

    def __len__(self) -> int:
        return len(self.files) + len(self.passed)


def split(entries: Iterable[Entry], size: int) -> list[Partition]:
    """The work list ``entries`` cut into partitions of about ``size`` entries, by the rule of the module docstring.

    Raises ValueError when ``size`` is below 1 or two entries share a stored path."""
    if size < 1:
        raise ValueError(f"partition size must be at least 1, got {size}")
    ordered = sorted(entries, key=lambda entry: entry.path)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if before.path == after.path:
            raise ValueError(f"the work list holds {after.path!r} twice")
    half = -(-size // 2)
    partitions: list[Partition] = []
    current: list[Entry] = []
    for entry in ordered:
        current.append(entry)
        if len(current) >= MAX_FACTOR * size or (len(current) >= half and is_cut_point(entry.path, half)):
            partitions.append(_partition(current))
            current = []
    if current:
        partitions.append(_partition(current))
    return partitions


def is_cut_point(path: str, half: int) -> bool:
    """Whether ``path`` may end a partition that already holds ``half`` entries (module docstring)."""
    digest = hashlib.blake2b(path.encode("utf-8"), digest_size=CUT_DIGEST_BYTES).digest()
    return int.from_bytes(digest, "big") % half == 0


def partition_name(entries: Iterable[Entry]) -> str:
    """The name of a partition of ``entries`` (in order): hex digits of their SHA-256 (module docstring)."""
    sha = hashlib.sha256()
    for entry in entries:
        reason = entry.reason if isinstance(entry, PassedOver) else ""
        sha.update(json.dumps([entry.path, entry.size, entry.mtime_ns, reason]).encode() + b"\n")
    return sha.hexdigest()[:NAME_HEX_DIGITS]


def _partition(entries: list[Entry]) -> Partition:
    files = tuple(entry for entry in entries if isinstance(entry, ScannedFile))
    passed = tuple(entry for entry in entries if isinstance(entry, PassedOver))
    return Partition(partition_name(entries), files, passed)
