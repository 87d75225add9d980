"""Index a text corpus (captions, labels) for image -> text queries, with the index's own model.

Texts go through :func:`clip_model.encode_texts` (the model's own tokenizer; a text longer than its context is
truncated, and counted), as the server encodes its text queries.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

import clip_model
from clip_model.process_tuning import ThreadPlan, own_threads

from .build import check_provenance, load_model
from .errors import IndexerError
from .store import Catalog, WriterLock, publish

logger = logging.getLogger(__name__)


def read_corpus(path: Path) -> list[str]:
    """Distinct non-blank lines of a UTF-8 file, stripped, in first-seen order."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise IndexerError(f"cannot read text corpus {path}: {exc}") from exc
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def index_texts(index_dir: Path, corpus: Path, batch_size: int = 256, plan: ThreadPlan | None = None) -> int:
    """Embed every entry of ``corpus`` with the model the index was built with; returns how many were added.

    Encoding runs on this thread with ``plan.torch_threads`` threads and publishing with ``plan.faiss_threads``
    (None: ``ThreadPlan.for_indexing()``); the thread gets its counts back after."""
    plan = plan or ThreadPlan.for_indexing()
    with own_threads(plan.torch_threads):
        return _index_texts(index_dir, corpus, batch_size, plan)


def _index_texts(index_dir: Path, corpus: Path, batch_size: int, plan: ThreadPlan) -> int:
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
        truncated = 0
        with catalog.transaction():
            for start in range(0, len(texts), batch_size):
                batch = texts[start : start + batch_size]
                with torch.inference_mode():
                    vectors, rows = clip_model.encode_texts(loaded.model, batch, text_input=text_input)
                truncated += sum(rows.truncated)
                catalog.add_texts(batch, np.ascontiguousarray(vectors.float().numpy()))
        if truncated:
            logger.warning("%d texts were longer than the model's context and were truncated", truncated)
        with own_threads(plan.faiss_threads):
            publish(index_dir, catalog, factory=catalog.factory() or "IDMap2,Flat")
    return len(texts)
