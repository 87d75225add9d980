"""The model record an index keeps names the family, tokenizer and resize rule; records from before read as CLIP's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from indexer.shards import ShardError, read_manifest, write_manifest
from indexer.store import Catalog, ModelInfo
from indexer.store.format import LEGACY_INPUTS

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CLIP = ModelInfo.of("tiny", "ab" * 32, 16, 32, MEAN, STD)
SIGLIP = ModelInfo.of("tiny-siglip", "cd" * 32, 16, 32, MEAN, STD, family="siglip", tokenizer="siglip",
                      resize_mode="squash")  # fmt: skip


def test_a_record_without_the_input_fields_reads_as_clip_with_the_shortest_side_resize() -> None:
    legacy = ModelInfo("tiny", "ab" * 32, 16, {"image_size": 32, "mean": list(MEAN), "std": list(STD)})
    assert legacy.preprocess == {**CLIP.preprocess} and legacy.same_embeddings(CLIP)
    assert {key: CLIP.preprocess[key] for key in LEGACY_INPUTS} == LEGACY_INPUTS
    assert SIGLIP.preprocess["family"] == "siglip" and SIGLIP.preprocess["resize_mode"] == "squash"


@pytest.mark.parametrize("field", ["family", "tokenizer", "resize_mode"])
def test_another_family_tokenizer_or_resize_rule_is_other_embeddings(field: str) -> None:
    other = ModelInfo.of(CLIP.name, CLIP.weights_sha256, 16, 32, MEAN, STD, **{field: "other"})
    assert not other.same_embeddings(CLIP)


def test_unknown_input_fields_are_refused() -> None:
    with pytest.raises(TypeError, match="unknown provenance fields"):
        ModelInfo.of("tiny", "ab" * 32, 16, 32, MEAN, STD, colour="red")


def test_the_catalog_keeps_the_fields_and_completes_a_legacy_row(tmp_path: Path) -> None:
    with Catalog.open(tmp_path / "index", create=True) as catalog:
        catalog.set_model(SIGLIP)
        assert catalog.model() == SIGLIP
    with Catalog.open(tmp_path / "legacy", create=True) as catalog:
        catalog._set_meta({"model_name": "tiny", "weights_sha256": "ab" * 32, "embed_dim": "16",
                           "preprocess": json.dumps({"image_size": 32, "mean": MEAN, "std": STD})})  # fmt: skip
        assert catalog.model() == CLIP


def test_shards_keep_the_fields_and_refuse_another_resize_rule(tmp_path: Path) -> None:
    write_manifest(tmp_path, SIGLIP, "/photos")
    assert read_manifest(tmp_path, expected=SIGLIP).model == SIGLIP
    cropped = ModelInfo.of(SIGLIP.name, SIGLIP.weights_sha256, 16, 32, MEAN, STD, family="siglip", tokenizer="siglip")
    with pytest.raises(ShardError, match="refused"):
        read_manifest(tmp_path, expected=cropped)
