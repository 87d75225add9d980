"""The inference thread: texts encoded at their real length give the full-context result, concurrent texts share
one encoder call, a full queue is a 503 at once, the LRU cache is bounded and keyed by the long-text mode, and long
texts are truncated (said so from the tokenizer's ids) or chunked and pooled before any search."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import clip_model
from app.encoder import Encoder, SearchRequest
from app.errors import ServiceBusyError
from app.metrics import Metrics
from clip_model.process_tuning import ThreadPlan
from indexer.store import Hit, ModelInfo

TEXTS = ["a", "a photo of a cat", "a very long description " * 5, "🙂 emoji", "x"]


@pytest.fixture
def encoder(app_model: Path) -> Iterator[Encoder]:
    model, preprocess = clip_model.load(app_model)
    info = ModelInfo.of("tiny", "sha", model.config.embed_dim, preprocess.image_size, preprocess.mean, preprocess.std)
    enc = Encoder(
        model,
        preprocess,
        info,
        Metrics(),
        plan=ThreadPlan.for_serving(),
        queue_size=4,
        text_batch_size=64,
        text_cache_size=3,
    )
    yield enc
    enc.close()


def test_texts_at_their_real_length_equal_the_full_context(encoder: Encoder) -> None:
    tokens = clip_model.tokenize(TEXTS)
    with torch.no_grad():
        full = encoder.model.encode_text(tokens, normalize=True).numpy()  # [5, 77] tokens, padding included
        alone = [clip_model.trim_tokens(tokens[i : i + 1]) for i in range(len(TEXTS))]  # each at its real length
        trimmed_alone = [encoder.model.encode_text(row, normalize=True) for row in alone]
    np.testing.assert_allclose(encoder.encode_text_matrix(TEXTS), full, atol=1e-5)
    np.testing.assert_allclose(torch.cat(trimmed_alone).numpy(), full, atol=1e-5)


def slow_batches(encoder: Encoder, seconds: float) -> list[int]:
    """Make each encoder call take ``seconds``; returns the list that collects each call's batch size."""
    sizes: list[int] = []
    original = encoder._encode_batch

    def slow(batch: list[object]) -> list[np.ndarray]:
        sizes.append(sum(len(job.inputs) for job in batch if job.kind != "vectors"))  # type: ignore[attr-defined]
        time.sleep(seconds)
        return original(batch)  # type: ignore[arg-type]

    encoder._encode_batch = slow  # type: ignore[method-assign]
    return sizes


def test_concurrent_texts_share_one_encoder_call(encoder: Encoder) -> None:
    sizes = slow_batches(encoder, 0.3)
    blocker = threading.Thread(target=encoder.encode_texts, args=(["first"],))
    blocker.start()
    time.sleep(0.1)  # the first call is now running; the next four wait together
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: encoder.encode_texts([t])[0].vector, ["b", "c", "d", "e"]))
    blocker.join()
    assert sizes == [1, 4]
    with torch.no_grad():
        expected = encoder.model.encode_text(clip_model.tokenize(["b", "c", "d", "e"]), normalize=True).numpy()
    np.testing.assert_allclose(np.stack(results), expected, atol=1e-5)


def test_a_full_queue_refuses_at_once(encoder: Encoder) -> None:
    slow_batches(encoder, 0.5)
    outcomes: list[str] = []

    def query(i: int) -> None:
        started = time.monotonic()
        try:
            encoder.encode_texts([f"query {i}"])
            outcomes.append("ok")
        except ServiceBusyError as exc:
            assert time.monotonic() - started < 0.2  # refused without waiting
            assert "busy" in str(exc) and exc.headers == {"Retry-After": "1"}
            outcomes.append("busy")

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(query, range(10)))
    assert outcomes.count("busy") >= 1 and outcomes.count("ok") >= 4  # 1 running + 4 queued always get through


def test_the_text_cache_is_an_lru_of_bounded_size(encoder: Encoder) -> None:
    sizes = slow_batches(encoder, 0.0)
    encoder.encode_texts(["a", "b", "c"])
    encoder.encode_texts(["a"])  # hit: "a" becomes the most recent
    encoder.encode_texts(["d"])  # evicts "b", the least recent
    assert sizes == [3, 1]
    encoder.encode_texts(["a", "c", "d"])
    assert sizes == [3, 1]
    encoder.encode_texts(["b"])
    assert sizes == [3, 1, 1]


def test_images_are_batched_and_unit_norm(encoder: Encoder) -> None:
    pixels = torch.randn(3, 3, encoder.image_size, encoder.image_size)
    vectors = encoder.encode_images(pixels)
    assert vectors.shape == (3, encoder.info.embed_dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_an_encoder_error_reaches_the_caller_and_the_thread_survives(encoder: Encoder) -> None:
    with pytest.raises(RuntimeError):
        encoder.encode_images(torch.randn(1, 3, 7, 7))  # wrong input size for the model
    assert encoder.encode_texts(["still works"])[0].vector.shape == (encoder.info.embed_dim,)


class RecordingIndex:
    """An exact index over random unit vectors that records the shape of every search call."""

    def __init__(self, dim: int, size: int = 50, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        vectors = rng.standard_normal((size, dim)).astype(np.float32)
        self.vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self.calls: list[tuple[int, int]] = []  # (queries, k) of each call

    def search(self, queries: np.ndarray, k: int, where: object = None) -> list[list[Hit]]:
        self.calls.append((len(queries), k))
        scores = queries @ self.vectors.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[Hit(int(i), float(row[i])) for i in top] for row, top in zip(scores, order, strict=True)]


def test_concurrent_text_searches_share_one_encoder_call_and_one_index_call(encoder: Encoder) -> None:
    index = RecordingIndex(encoder.info.embed_dim)
    sizes = slow_batches(encoder, 0.3)
    blocker = threading.Thread(target=encoder.encode_texts, args=(["first"],))
    blocker.start()
    time.sleep(0.1)  # the first call is now running; the searches below wait together
    texts, ks = ["b", "c", "d", "e"], [1, 3, 10, 5]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t, k: encoder.search_text(t, SearchRequest(index, k)), texts, ks))
    blocker.join()
    assert sizes == [1, 4] and index.calls == [(4, 10)]  # one FAISS call at the largest k
    for (embedding, hits), k in zip(results, ks, strict=True):
        assert len(hits) == k  # each job gets its own k
        alone = index.search(embedding.vector[None], k)[0]  # the same hits as a search of its own
        assert [h.id for h in hits] == [h.id for h in alone]
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in alone], atol=1e-6)


def test_searches_of_cached_texts_and_stored_vectors_join_the_text_batch(encoder: Encoder) -> None:
    index = RecordingIndex(encoder.info.embed_dim)
    encoder.encode_texts(["cached"])
    sizes = slow_batches(encoder, 0.3)
    blocker = threading.Thread(target=encoder.encode_texts, args=(["first"],))
    blocker.start()
    time.sleep(0.1)
    stored = index.vectors[7:8]
    with ThreadPoolExecutor(3) as pool:
        fresh = pool.submit(encoder.search_text, "fresh", SearchRequest(index, 2))
        cached = pool.submit(encoder.search_text, "cached", SearchRequest(index, 2))
        by_vector = pool.submit(encoder.search_vectors, stored, SearchRequest(index, 2))
        results = fresh.result(), cached.result(), by_vector.result()
    blocker.join()
    assert sizes == [1, 1]  # only "fresh" needed encoding
    assert index.calls == [(3, 2)]
    assert results[2][0][0] == Hit(7, pytest.approx(1.0))  # a stored vector finds itself first


def test_a_failing_index_fails_only_its_own_searches(encoder: Encoder) -> None:
    class BrokenIndex:
        def search(self, queries: np.ndarray, k: int, where: object = None) -> list[list[Hit]]:
            raise RuntimeError("index is closed")

    good, broken = RecordingIndex(encoder.info.embed_dim), BrokenIndex()
    slow_batches(encoder, 0.3)
    blocker = threading.Thread(target=encoder.encode_texts, args=(["first"],))
    blocker.start()
    time.sleep(0.1)
    with ThreadPoolExecutor(2) as pool:
        ok = pool.submit(encoder.search_text, "good", SearchRequest(good, 3))
        bad = pool.submit(encoder.search_text, "bad", SearchRequest(broken, 3))
        assert len(ok.result()[1]) == 3
        with pytest.raises(RuntimeError, match="closed"):
            bad.result()
    blocker.join()
    assert encoder.encode_texts(["bad"])[0].vector.shape == (encoder.info.embed_dim,)  # encoded and cached anyway


class ThreadCountIndex(RecordingIndex):
    """Records, at each search, the thread it runs on and that thread's torch and FAISS thread counts."""

    seen: tuple[str, int, int] | None = None

    def search(self, queries: np.ndarray, k: int, where: object = None) -> list[list[Hit]]:
        import faiss

        self.seen = (threading.current_thread().name, torch.get_num_threads(), faiss.omp_get_max_threads())
        return super().search(queries, k)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_inference_thread_sets_its_own_torch_and_faiss_thread_counts(app_model: Path, threads: int) -> None:
    model, preprocess = clip_model.load(app_model)
    info = ModelInfo.of("tiny", "sha", model.config.embed_dim, preprocess.image_size, preprocess.mean, preprocess.std)
    before = torch.get_num_threads()
    enc = Encoder(model, preprocess, info, Metrics(), plan=ThreadPlan.for_serving(threads))
    try:
        index = ThreadCountIndex(info.embed_dim)
        enc.search_text("a cat", SearchRequest(index, 3))
        assert index.seen == ("clip-inference", threads, threads)
        assert torch.get_num_threads() == before  # OpenMP counts are per thread: the caller's is untouched
    finally:
        enc.close()


LONG = "a photo of a dog running on the beach at dusk with a red ball " * 12  # about 170 tokens


def test_truncation_is_read_from_the_tokenizers_ids(encoder: Encoder) -> None:
    capacity = encoder.text_input.capacity  # 75 of CLIP's 77 positions
    fits, over = " ".join(["cat"] * capacity), " ".join(["cat"] * (capacity + 1))
    assert [e.truncated for e in encoder.encode_texts([fits, over, "a cat"])] == [False, True, False]
    assert [e.chunks for e in encoder.encode_texts([fits, over], "chunk")] == [1, 2]


def test_chunked_long_texts_are_pooled_windows_and_fitting_texts_embed_as_truncated(encoder: Encoder) -> None:
    sizes = slow_batches(encoder, 0.0)
    chunked = encoder.encode_texts([LONG, "a photo of a cat"], "chunk")
    windows = len(encoder.text_input.windows(LONG))
    assert [e.chunks for e in chunked] == [windows, 1] and windows > 2 and sizes == [windows + 1]
    assert not any(e.truncated for e in chunked)
    with torch.inference_mode():
        expected, _ = clip_model.encode_texts(encoder.model, [LONG, "a photo of a cat"], "chunk")
    np.testing.assert_allclose(np.stack([e.vector for e in chunked]), expected.numpy(), atol=1e-5)
    truncated = encoder.encode_texts([LONG, "a photo of a cat"])  # another cache key: encoded again
    assert sizes == [windows + 1, 2] and truncated[0].truncated and truncated[0].chunks == 1
    assert not np.allclose(truncated[0].vector, chunked[0].vector, atol=1e-3)
    alone = [encoder.encode_texts(["a dog"], mode)[0].vector for mode in ("chunk", "truncate")]
    assert np.array_equal(alone[0], alone[1])  # a text that fits: the same bits either way


def test_a_chunked_search_is_pooled_before_it_searches_beside_other_queries(encoder: Encoder) -> None:
    index = RecordingIndex(encoder.info.embed_dim)
    sizes = slow_batches(encoder, 0.3)
    blocker = threading.Thread(target=encoder.encode_texts, args=(["first"],))
    blocker.start()
    time.sleep(0.1)
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(encoder.search_text, LONG, SearchRequest(index, 4), "chunk")
        short = pool.submit(encoder.search_text, "a cat", SearchRequest(index, 4), "chunk")
        results = long.result(), short.result()
    blocker.join()
    windows = len(encoder.text_input.windows(LONG))
    assert sizes == [1, windows + 1] and index.calls == [(2, 4)]  # one encoder call, one FAISS call of 2 queries
    for embedding, hits in results:
        assert abs(float(np.linalg.norm(embedding.vector)) - 1) < 1e-5
        assert [h.id for h in hits] == [h.id for h in index.search(embedding.vector[None], 4)[0]]
    assert results[0][0].chunks == windows and results[1][0].chunks == 1
