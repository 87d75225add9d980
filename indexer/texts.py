"""Index a text corpus (captions, labels) for image -> text queries, with the index's own model.

Texts go through :func:`clip_model.encode_texts` (the model's own tokenizer), as the server encodes its text
queries: a text longer than the model's context is truncated or, with ``long_text="chunk"``, encoded as overlapping
windows whose unit embeddings are averaged, the same rule and the same vectors as the server's ``long_text``.

The catalog records how its texts were encoded (:meth:`indexer.store.Catalog.text_long_text`, copied into each
generation's manifest): this run's mode when the earlier texts were encoded the same way or this run re-encoded all
of them, else ``"mixed"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import clip_model
from clip_model import LONG_TEXT_MODES, LongText
from clip_model.process_tuning import ThreadPlan, own_threads

from .build import check_provenance, load_model
from .errors import IndexerError
from .store import Catalog, WriterLock, publish

logger = logging.getLogger(__name__)

MIXED = "mixed"  # the catalog's record when its texts were encoded by runs with different modes


@dataclass(frozen=True)
class TextsIndexed:
    """What one :func:`index_texts` run did: ``count`` distinct texts encoded with ``long_text``; ``chunked`` of them
    were longer than the context and encoded in several windows, ``truncated`` were longer and cut (one of the two is
    0); ``recorded``: the catalog's record afterwards (``long_text`` or ``"mixed"``)."""

    count: int
    long_text: LongText
    chunked: int
    truncated: int
    recorded: str


def read_corpus(path: Path) -> list[str]:
    """Distinct non-blank lines of a UTF-8 file, stripped, in first-seen order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexerError(f"cannot read text corpus {path}: {exc}") from exc
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def index_texts(
    index_dir: Path,
    corpus: Path,
    batch_size: int = 256,
    plan: ThreadPlan | None = None,
    long_text: LongText = "truncate",
) -> TextsIndexed:
    """Embed every entry of ``corpus`` with the model the index was built with, texts longer than its context as
    ``long_text`` says, and publish.

    Encoding runs on this thread with ``plan.torch_threads`` threads and publishing with ``plan.faiss_threads``
    (None: ``ThreadPlan.for_indexing()``); the thread gets its counts back after. IndexerError for an unknown
    ``long_text``, before the index is touched."""
    if long_text not in LONG_TEXT_MODES:
        raise IndexerError(f"long_text must be one of {', '.join(LONG_TEXT_MODES)}, got {long_text!r}")
    plan = plan or ThreadPlan.for_indexing()
    with own_threads(plan.torch_threads):
        return _index_texts(index_dir, corpus, batch_size, plan, long_text)


def _index_texts(index_dir: Path, corpus: Path, batch_size: int, plan: ThreadPlan, long_text: LongText) -> TextsIndexed:
    texts = read_corpus(corpus)
    if not texts:
        raise IndexerError(f"{corpus} holds no text (one entry per line)")
    with WriterLock(index_dir), Catalog.open(index_dir) as catalog:
        built_with = catalog.model()
        if built_with is None:
            raise IndexerError(f"{index_dir} has no model yet: build it from an image folder first")
        loaded = load_model(built_with.name)
        check_provenance(catalog, loaded.info, index_dir)
        text_input = clip_model.TextInput.of(loaded.model)
        earlier = catalog.text_long_text() if catalog.counts()["texts"] else None
        chunked = truncated = 0
        with catalog.transaction():
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                with torch.inference_mode():
                    vectors, rows = clip_model.encode_texts(loaded.model, batch, long_text, text_input)
                chunked += sum(n > 1 for n in rows.chunks)
                truncated += sum(rows.truncated)
                catalog.add_texts(batch, np.ascontiguousarray(vectors.float().numpy()))
            all_encoded_now = catalog.counts()["texts"] == len(texts)
            recorded = long_text if earlier in (None, long_text) or all_encoded_now else MIXED
            catalog.set_text_long_text(recorded)
        if truncated:
            logger.warning(
                "%d texts were longer than the model's context and were truncated (--long-text chunk reads them all)",
                truncated,
            )
        if recorded == MIXED:
            logger.warning(
                "texts indexed earlier were encoded with long_text=%s, these with %s: index every corpus again with "
                "one --long-text for one rule",
                earlier,
                long_text,
            )
        with own_threads(plan.faiss_threads):
            publish(index_dir, catalog, factory=catalog.factory() or "IDMap2,Flat")
    return TextsIndexed(len(texts), long_text, chunked, truncated, recorded)
