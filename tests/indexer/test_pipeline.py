"""The encoding pipeline's own guarantees: every file accounted for, and a decoder crash costs one file only."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np

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
