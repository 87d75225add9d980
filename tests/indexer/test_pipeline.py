"""The encoding pipeline's own guarantees: every file accounted for, and a decoder crash costs one file only."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_model.preprocess import normalize_pixels
from indexer.decode import Decoded, DecodeFailure, DecodeSpec, decode_file
from indexer.pipeline import Encoded, encode_files
from indexer.scan import ScannedFile, iter_images
from tests.indexer.conftest import write_photos

SPEC = DecodeSpec(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def crash_on_poison(root: Path, scanned: ScannedFile, spec: DecodeSpec) -> Decoded | DecodeFailure:
    """decode_file, except that a file named poison* kills its process the way a decoder segfault would."""
    if Path(scanned.path).name.startswith("poison"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return decode_file(root, scanned, spec)


def mean_pixel_encoder(batch: np.ndarray) -> np.ndarray:
    vectors = batch.reshape(len(batch), 3, -1).mean(axis=2) + 3.0
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_every_file_comes_out_once_in_order(tmp_path: Path) -> None:
    write_photos(tmp_path, 40)
    files = list(iter_images(tmp_path))
    results = list(encode_files(tmp_path, files, SPEC, mean_pixel_encoder, workers=2, batch_size=8))
    assert sorted(r.decoded.path for r in results if isinstance(r, Encoded)) == [f.path for f in files]
    assert all(r.embedding is not None and r.embedding.shape == (3,) for r in results if isinstance(r, Encoded))


def test_decode_workers_outlive_the_thread_that_started_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Workers spawn on the thread that first asks for a file; they must not die when it ends (a parent-death
    signal tied to that thread would kill them, and every file in flight would be retried one by one)."""
    write_photos(tmp_path, 40)
    results = encode_files(tmp_path, list(iter_images(tmp_path)), SPEC, mean_pixel_encoder, workers=2, batch_size=8)
    first: list[Encoded | DecodeFailure] = []
    thread = threading.Thread(target=lambda: first.append(next(results)))  # starts the pool on a thread that ends
    thread.start()
    thread.join()
    rest = list(results)
    assert len(first + rest) == 40 and all(isinstance(r, Encoded) for r in first + rest)
    assert "a decode worker died" not in caplog.text


def test_a_file_that_crashes_its_decoder_is_skipped_and_the_rest_indexed(tmp_path: Path) -> None:
    write_photos(tmp_path, 30)
    (tmp_path / "photo_00007.jpg").rename(tmp_path / "poison.jpg")
    files = list(iter_images(tmp_path))
    results = list(
        encode_files(tmp_path, files, SPEC, mean_pixel_encoder, workers=2, batch_size=2, decode=crash_on_poison)
    )
    failures = [r for r in results if isinstance(r, DecodeFailure)]
    assert [(f.path, f.reason) for f in failures] == [("poison.jpg", "corrupt: crashed the decoder")]
    assert len([r for r in results if isinstance(r, Encoded)]) == 29


def test_streams_encode_batches_at_once_on_their_own_threads_and_keep_each_vector_with_its_file(
    tmp_path: Path,
) -> None:
    write_photos(tmp_path, 45)
    files = list(iter_images(tmp_path))
    calls: list[tuple[str, int]] = []
    running, most_running, lock = 0, 0, threading.Lock()

    def slow_encoder(batch: np.ndarray) -> np.ndarray:
        nonlocal running, most_running
        with lock:
            running += 1
            most_running = max(most_running, running)
            calls.append((threading.current_thread().name, torch.get_num_threads()))
        time.sleep(0.05)  # long enough for the other streams to start theirs
        with lock:
            running -= 1
        return mean_pixel_encoder(batch)

    results = list(encode_files(tmp_path, files, SPEC, slow_encoder, workers=0, batch_size=4, streams=3,
                                stream_threads=2))  # fmt: skip
    encoded = [r for r in results if isinstance(r, Encoded)]
    assert sorted(r.decoded.path for r in encoded) == [f.path for f in files]
    for result in encoded:  # each vector is its own image's, whichever stream encoded it
        pixels = normalize_pixels(result.decoded.pixels[None], SPEC.mean, SPEC.std)
        assert result.embedding is not None and np.allclose(result.embedding, mean_pixel_encoder(pixels)[0])
    assert len(calls) == 12 and most_running == 3
    assert {name.startswith("encode") for name, _ in calls} == {True}
    assert {threads for _, threads in calls} == {2}


def test_an_encoder_error_in_a_stream_reaches_the_caller(tmp_path: Path) -> None:
    write_photos(tmp_path, 20)

    def failing_encoder(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("out of memory in the encoder")

    results = encode_files(tmp_path, list(iter_images(tmp_path)), SPEC, failing_encoder, workers=0, batch_size=4,
                           streams=2)  # fmt: skip
    with pytest.raises(RuntimeError, match="out of memory in the encoder"):
        list(results)
    assert not [t for t in threading.enumerate() if t.name.startswith("encode")]  # the stream threads are gone
