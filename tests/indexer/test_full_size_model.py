"""One run with a full-size architecture (ViT-B/32, random weights): the real shapes through the whole indexer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model
from clip_model.process_tuning import ThreadPlan
from indexer.build import BuildOptions, build_index
from indexer.store import Catalog, PublishedIndex, verify
from tests.indexer.conftest import write_photo


@pytest.mark.slow  # heavy end to end (seconds): CI runs it, make check leaves it out
def test_vit_b32_end_to_end(tmp_path: Path) -> None:
    model, preprocess = clip_model.create_model("ViT-B-32-quickgelu", seed=0)
    checkpoint = clip_model.save_checkpoint(model.eval(), tmp_path / "vit-b-32.safetensors")
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    paths = [write_photo(root / f"{i}.jpg", seed=i, size=(640, 480)) for i in range(4)]

    stats = build_index(
        BuildOptions(
            root=root, index_dir=index_dir, model=str(checkpoint), plan=ThreadPlan.for_indexing(workers=1), draft=False
        )
    )

    assert (stats.encoded, stats.skipped) == (4, 0) and verify(index_dir) == []
    index = PublishedIndex.open(index_dir)
    assert index.manifest.embed_dim == 512 and index.manifest.preprocess["image_size"] == 224
    assert index.manifest.weights_sha256 == clip_model.weights_sha256(model)
    with Catalog.open(index_dir, readonly=True) as catalog:
        image_id = catalog.files()[paths[2].name].id
    with torch.no_grad():
        expected = model.encode_image(preprocess(Image.open(paths[2]))[None], normalize=True)[0].numpy()
    stored = index.embedding(image_id)
    assert stored is not None and np.allclose(stored, expected, atol=1e-5)
    assert index.search(expected[None], k=1)[0][0].id == image_id
