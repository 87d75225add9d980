"""Exceptions raised by indexer. Library code raises these; only ``indexer/cli.py`` maps them to exit codes and the
app maps the reader's ones to HTTP (e.g. :class:`IndexNotFoundError` -> 503 on /readyz)."""

from __future__ import annotations


class IndexerError(Exception):
    """Base class for every error indexer raises on purpose."""


class IndexNotFoundError(IndexerError):
    """There is no index at a directory, or nothing has been published in it yet."""


class IndexFormatError(IndexerError):
    """An index directory cannot be read: unknown or newer format version, corrupt manifest or catalog, a file whose
    checksum does not match, a truncated FAISS file."""


class GenerationRetiredError(IndexerError):
    """A reader asked about a generation whose superseded catalog rows were dropped by later publishes: it must load
    the published generation (the app answers 503 and reloads)."""


class IndexLockedError(IndexerError):
    """Another writer holds an index directory's lock; the message names its pid and the directory."""


class ModelMismatchError(IndexerError):
    """An update asked for a different model than the one the index was built with."""


class IndexBuildError(IndexerError):
    """FAISS cannot build the requested index, e.g. an IVF factory with more lists than there are vectors."""


class ShardError(IndexerError):
    """A shards directory, manifest or shard cannot be used; the message names the file (and row) and the remedy."""


class EmbeddingError(IndexerError, ValueError):
    """An embedding has the wrong shape, dtype or norm (vectors must be float32 [D] or [N, D] and unit-norm)."""
