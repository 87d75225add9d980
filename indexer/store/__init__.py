"""The on-disk format of an index directory: the indexer writes it, the server reads it.

Modules, from the bottom up:

* ``format``: the directory layout, manifest.json and the records it holds (the contract).
* ``schema``: the catalog's SQLite tables, how they record which generation shows which version of a row, and the
  in-place upgrade of older catalogs.
* ``lock``: :class:`WriterLock`, one writer at a time.
* ``catalog``: :class:`Catalog`, the record of truth.
* ``publishing``: :func:`publish`, the catalog's vectors built into FAISS files and published as a new generation.
* ``reader``: :class:`PublishedIndex`, the published generation as the server reads it; the server imports this
  module only.
* ``verification``: :func:`verify`, a published generation checked against its manifest and the catalog.

This package re-exports what the indexer, the benchmarks and the tests use.
"""

from .catalog import Catalog
from .format import (
    CATALOG_FILE,
    CURRENT_FILE,
    GENERATIONS_DIR,
    IMAGES_FILE,
    MANIFEST_FILE,
    FileRecord,
    ImageRecord,
    Manifest,
    ModelInfo,
    NewImage,
)
from .lock import WriterLock
from .publishing import publish, resolve_index_request, up_to_date
from .reader import ENV_PREFIX, Hit, PublishedIndex, current_generation, read_manifest
from .schema import DEFAULT_FACTORY
from .verification import verify

__all__ = [
    "CATALOG_FILE",
    "CURRENT_FILE",
    "DEFAULT_FACTORY",
    "ENV_PREFIX",
    "GENERATIONS_DIR",
    "IMAGES_FILE",
    "MANIFEST_FILE",
    "Catalog",
    "FileRecord",
    "NewImage",
    "Hit",
    "ImageRecord",
    "Manifest",
    "ModelInfo",
    "PublishedIndex",
    "WriterLock",
    "current_generation",
    "publish",
    "read_manifest",
    "resolve_index_request",
    "up_to_date",
    "verify",
]
