"""The fine-tuning demo: the demo model never saw pink; LoRA on a small captioned set with pink shapes teaches it
pink without losing the colours it knew. Also the novel-colour sets it trains on and the per-colour recall it is
measured with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from clip_model.train import synthetic
from clip_model.train.evaluate import EncodedDataset, normalize_caption

NOVEL = "pink"


def test_a_novel_colour_set_is_deterministic_and_keeps_the_splits_pairs(tmp_path: Path) -> None:
    many = synthetic.generate(tmp_path / "a", 60, "train", seed=1, image_size=32, novel_color=NOVEL, novel_share=0.5)
    few = synthetic.generate(tmp_path / "b", 20, "train", seed=1, image_size=32, novel_color=NOVEL, novel_share=0.5)
    records = synthetic.load_records(many)
    for first, again in zip(records, synthetic.load_records(few), strict=False):  # image i depends on i alone
        assert first.caption == again.caption and first.path.read_bytes() == again.path.read_bytes()
    pink = [r for r in records if r.color == NOVEL]
    assert 15 <= len(pink) <= 45 and all(NOVEL in r.caption for r in pink)
    assert {(r.color, r.shape) for r in records if r.color != NOVEL} <= set(synthetic.combinations("train"))
    plain = synthetic.load_records(synthetic.generate(tmp_path / "c", 60, "train", seed=1, image_size=32))
    assert not any(NOVEL in r.caption for r in plain)  # the splits never show it
    with pytest.raises(ValueError, match="novel colour"):
        synthetic.generate(tmp_path / "d", 5, "heldout", novel_color=NOVEL)
    with pytest.raises(ValueError, match="novel colour"):
        synthetic.generate(tmp_path / "d", 5, "train", novel_color="teal")


def test_recall_by_color_scores_each_colours_queries_against_the_whole_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = synthetic.generate(tmp_path / "set", 40, "test", seed=2, image_size=32, novel_color=NOVEL)
    records = synthetic.load_records(root)
    queries = [normalize_caption(synthetic.attribute_query(r)) for r in records]
    texts = list(dict.fromkeys(queries))
    blind = {"value": False}

    def encode(*_: Any) -> EncodedDataset:  # one axis per distinct query: a perfect model, or a blind one
        images = torch.eye(len(texts))[[texts.index(q) for q in queries]]
        text_rows = torch.ones(len(texts), len(texts)) if blind["value"] else torch.eye(len(texts))
        return EncodedDataset(images, text_rows, texts)

    monkeypatch.setattr("clip_model.train.evaluate.encode_dataset", encode)
    perfect = synthetic.recall_by_color(None, None, root)  # type: ignore[arg-type]  # the encoder is replaced
    assert set(perfect) == {r.color for r in records} and all(v["recall@1"] == 1.0 for v in perfect.values())
    pink_texts = {q for q, r in zip(queries, records, strict=True) if r.color == NOVEL}
    assert perfect[NOVEL]["queries"] == len(pink_texts)
    expected = sum(queries.count(t) for t in pink_texts) / len(queries) / len(pink_texts)
    assert perfect[NOVEL]["chance"] == pytest.approx(expected)
    blind["value"] = True  # every query's best image is the first one: only its own query finds it
    found = synthetic.recall_by_color(None, None, root)  # type: ignore[arg-type]  # the encoder is replaced
    assert sum(v["recall@1"] * v["queries"] for v in found.values()) == 1
