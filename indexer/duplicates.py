"""Groups of duplicate images in a published generation: byte-identical files and near-duplicates.

Contracts:

* Exact duplicates are images with the same content hash (sha256 of the file's bytes). Near-duplicates are pairs of
  images whose embeddings have a cosine similarity of at least ``threshold``. A group is a connected component of
  both kinds of pairs (union-find): A~B and B~C put A, B and C in one group even when A and C score below the
  threshold.
* Only the ok images of the generation take part, and with ``folder`` only those under it (the folder rule of
  :class:`indexer.store.filters.SearchFilter`).
* Pairs come from FAISS range searches over exact inner-product indexes, one block of vectors against another (read
  from the vector files), so memory holds two blocks of vectors and one block's pairs, never the whole collection.
  Time grows with the square of the images compared (see bench/README.md, "duplicates").
* Order: a group's first member is its smallest id; the others follow by similarity to it, highest first, then by
  id. Groups come larger first, then by first id. The same generation and arguments give the same list, so pages
  of it stay stable.

The default threshold. A cosine similarity means different things under different models, and no one threshold
separates every copy from every other photo: how far a model moves a photo that is cropped, or taken again a moment
later, depends on the model. ``DEFAULT_THRESHOLD`` favours precision, because the complaint users make of CLIP
duplicate finders is distinct photos of one scene shown as duplicates (immich #31487: two exposures of a burst, a
smile and a frown), and a duplicate list invites deleting. On the planted copies and unrelated photos of the test
folder, under the ViT-B/32 architecture (random weights) and the trained demo model, re-encoded, half-size and
EXIF-rotated copies all scored above it and no two unrelated photos did; slight crops did under ViT-B/32 and mostly
did not under the small demo model; second exposures of a scene stayed below it under the demo model but not under
random weights, which place them as close as crops (numbers in bench/README.md, "duplicates"). So a group at the
default is meant to be copies of one photo, and a lower threshold finds similar photos, bursts included. Each member
also says whether its bytes are the first member's (``kind``) and how close it is to it (``similarity``), so a
reviewer sees what a group is made of.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from . import _faiss_io
from .store.filters import SearchFilter

if TYPE_CHECKING:
    from .store.reader import PublishedIndex

DEFAULT_THRESHOLD = 0.995  # cosine similarity; the module docstring says why
MIN_THRESHOLD = 0.9  # below it, "duplicates" become whole topics and the pairs to join grow with the square
BASE_BLOCK_ROWS = 16_384  # vectors in one exact index (32 MiB at 512-d)
QUERY_BLOCK_ROWS = 2_048  # queries per range search: at most QUERY x BASE pairs come back at once
MEMBER_CHUNK_ROWS = 16_384  # members whose vectors are read at once to score them against their first member

Kind = Literal["exact", "near"]
Rows = npt.NDArray[np.int64]
ReadRows = Callable[[int, int], npt.NDArray[np.float32]]  # (start, stop) -> those rows' [stop - start, D] vectors


@dataclass(frozen=True, slots=True)
class Member:
    """One image of a group: ``similarity`` is its cosine similarity to the group's first member; ``kind`` is
    "exact" when another member of the group has the same content hash (a byte-identical copy), else "near"."""

    id: int
    path: str  # stored form (indexer.paths)
    similarity: float
    kind: Kind


@dataclass(frozen=True)
class DuplicateGroup:
    """Two or more images that are copies of each other (module docstring), first member first."""

    kind: Kind  # "exact" when every member has the same content hash, else "near"
    members: tuple[Member, ...]


@dataclass(frozen=True)
class Duplicates:
    """The groups of one generation at one threshold (and folder), and what was compared."""

    generation: str
    threshold: float
    folder: str | None
    images: int  # the images compared
    groups: list[DuplicateGroup]
    seconds: float


def check_threshold(threshold: float) -> float:
    """``threshold`` if it lies in [MIN_THRESHOLD, 1]; else ValueError saying so."""
    if not MIN_THRESHOLD <= threshold <= 1.0:
        raise ValueError(f"the similarity threshold must lie between {MIN_THRESHOLD} and 1, got {threshold}")
    return threshold


def find_duplicates(
    index: PublishedIndex, threshold: float = DEFAULT_THRESHOLD, folder: str | None = None
) -> Duplicates:
    """The duplicate groups among the images of ``index``'s generation (under ``folder``, a stored-form folder
    relative to the image root, if given) at cosine similarity ``threshold``. FAISS runs on the calling thread's
    thread count. ValueError for a threshold outside [MIN_THRESHOLD, 1]."""
    check_threshold(threshold)
    started = time.perf_counter()
    columns = index.photo_columns()
    rows = np.arange(len(columns)) if folder is None else np.flatnonzero(columns.mask(SearchFilter(folders=(folder,))))
    ids, files, vec_rows = columns.ids[rows], columns.vec_files[rows], columns.vec_rows[rows]

    def read(start: int, stop: int) -> npt.NDArray[np.float32]:
        return index.stored_vectors(files[start:stop], vec_rows[start:stop])

    parent = np.arange(len(ids), dtype=np.int64)
    for left, right in near_pairs(read, len(ids), threshold):
        union(parent, left, right)
    for same in index.same_content():
        found = _positions(ids, same)
        union(parent, np.repeat(found[:1], max(len(found) - 1, 0)), found[1:])
    groups = _groups(index, ids, roots(parent), lambda at: index.stored_vectors(files[at], vec_rows[at]))
    elapsed = time.perf_counter() - started
    return Duplicates(index.manifest.generation, threshold, folder, len(ids), groups, elapsed)


def near_pairs(read: ReadRows, count: int, threshold: float) -> Iterator[tuple[Rows, Rows]]:
    """Every pair of rows i < j of the [count, D] unit vectors ``read`` gives whose inner product is at least
    ``threshold``, as (i's, j's), one block at a time (the module's memory contract)."""
    for base_start in range(0, count, BASE_BLOCK_ROWS):
        base_stop = min(count, base_start + BASE_BLOCK_ROWS)
        base = read(base_start, base_stop)
        index = _faiss_io.exact_index(base)
        for query_start in range(0, base_stop, QUERY_BLOCK_ROWS):
            query_stop = min(base_stop, query_start + QUERY_BLOCK_ROWS)
            if query_start >= base_start:
                queries = base[query_start - base_start : query_stop - base_start]
            else:
                queries = read(query_start, query_stop)
            query_rows, base_rows, _ = _faiss_io.range_search(index, queries, threshold)
            left, right = query_rows + query_start, base_rows + base_start
            keep = left < right  # each pair once, and no row with itself
            if keep.any():
                yield left[keep], right[keep]


def union(parent: Rows, left: Rows, right: Rows) -> None:
    """Join the components of each pair (``left[i]``, ``right[i]``) in the union-find forest ``parent`` (a root
    points to itself, and every row to a smaller or equal one, so a component's root is its smallest row)."""
    while len(left):
        a, b = _find(parent, left), _find(parent, right)
        apart = a != b
        if not apart.any():
            break
        low, high = np.minimum(a[apart], b[apart]), np.maximum(a[apart], b[apart])
        np.minimum.at(parent, high, low)  # several pairs may hook one root: the lowest wins, the others loop again
        left, right = left[apart], right[apart]
    _compress(parent)


def roots(parent: Rows) -> Rows:
    """The root (smallest row) of every row's component."""
    _compress(parent)
    return parent.copy()


def _find(parent: Rows, rows: Rows) -> Rows:
    found = parent[rows]
    while not np.array_equal(above := parent[found], found):
        found = above
    return found


def _compress(parent: Rows) -> None:
    while not np.array_equal(above := parent[parent], parent):
        parent[:] = above


def _positions(ids: Rows, wanted: Sequence[int]) -> Rows:
    """The positions in the sorted ``ids`` of those of ``wanted`` it holds."""
    if not len(ids):
        return np.empty(0, dtype=np.int64)
    wanted_ids = np.asarray(wanted, dtype=np.int64)
    at = np.minimum(np.searchsorted(ids, wanted_ids), len(ids) - 1)
    found: Rows = at[ids[at] == wanted_ids]
    return found


def _groups(
    index: PublishedIndex, ids: Rows, labels: Rows, vectors_at: Callable[[Rows], npt.NDArray[np.float32]]
) -> list[DuplicateGroup]:
    """The components of two or more rows (``labels``: each row's root) as ordered groups (module docstring)."""
    members = np.flatnonzero(np.bincount(labels, minlength=len(labels))[labels] >= 2)
    similarity = np.empty(len(members), dtype=np.float32)
    for start in range(0, len(members), MEMBER_CHUNK_ROWS):
        part = members[start : start + MEMBER_CHUNK_ROWS]
        similarity[start : start + len(part)] = np.einsum("nd,nd->n", vectors_at(part), vectors_at(labels[part]))
    records = index.images(ids[members].tolist())
    by_first: dict[int, list[tuple[int, float]]] = {}  # first member's id -> (id, similarity) of every member
    for row, score in zip(members.tolist(), similarity.tolist(), strict=True):
        by_first.setdefault(int(ids[labels[row]]), []).append((int(ids[row]), score))
    groups = []
    for first, scored in by_first.items():
        ordered = sorted(scored, key=lambda item: (item[0] != first, -item[1], item[0]))
        content = {image_id: records[image_id].content_hash or f"id {image_id}" for image_id, _ in ordered}
        hashes = Counter(content.values())
        group = tuple(
            Member(
                image_id,
                records[image_id].path,
                1.0 if image_id == first else round(min(score, 1.0), 6),
                "exact" if hashes[content[image_id]] > 1 else "near",
            )
            for image_id, score in ordered
        )
        groups.append(DuplicateGroup("exact" if len(hashes) == 1 else "near", group))
    return sorted(groups, key=lambda group: (-len(group.members), group.members[0].id))
