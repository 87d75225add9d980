"""The text tower compiled in the background: the same embeddings as eager at every batch size and length, no
compile while serving, and a failed compile leaves the eager tower serving with the reason shown."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clip_model
from app import compiled as compiled_module
from app.compiled import CompiledText
from clip_model.process_tuning import ThreadPlan
from clip_model.process_tuning.threads import default_thread_count, run_in_fresh_thread, single_threaded_elsewhere

SHAPES = [(1, 2), (1, 9), (1, 77), (2, 5), (7, 13), (64, 77)]  # (texts, tokens)


def _tokens(batch: int, length: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(batch * 100 + length)
    tokens = torch.randint(1, 49406, (batch, length), generator=generator)
    tokens[:, 0], tokens[:, -1] = 49406, 49407  # start and end of text: the end token is each row's argmax
    return tokens


@pytest.mark.slow  # compiles the text tower twice
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_compiled_tower_matches_eager_at_every_shape_without_recompiling(
    app_model: Path, precision: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, _ = clip_model.load(app_model, precision=precision)  # type: ignore[arg-type]
    if precision == "fp32":
        model = clip_model.pack_for_cpu(model)  # what the server compiles in fp32: the packed linear layers
    # the count of the thread that will call it
    text = CompiledText(model.eval(), torch.get_num_threads(), clip_model.TextInput.of(model))
    assert not text.ready and text.status.startswith("eager")
    default = run_in_fresh_thread(torch.get_num_threads)
    text.start().join(timeout=600)
    assert text.ready, text.status
    assert run_in_fresh_thread(torch.get_num_threads) == default  # new threads' default is left alone
    assert text.status.startswith("compiled")
    with caplog.at_level(logging.WARNING, logger="app.compiled"), torch.inference_mode():
        for batch, length in SHAPES:
            tokens = _tokens(batch, length)
            got, want = text.encode(tokens), text.eager(tokens)
            assert got.shape == (batch, model.config.embed_dim)
            assert F.cosine_similarity(got, want, dim=-1).min().item() > 0.999
    assert not [r for r in caplog.records if "does not cover" in r.getMessage()]  # every shape ran compiled


def test_without_a_compiler_the_eager_tower_serves_and_says_why(
    app_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compiled_module.shutil, "which", lambda name: None)
    model, _ = clip_model.load(app_model)
    text = CompiledText(model.eval(), 1, clip_model.TextInput.of(model))
    text.start().join(timeout=60)
    assert not text.ready and "no C++ compiler" in text.status
    with torch.inference_mode():
        assert torch.equal(text.encode(_tokens(2, 5)), text.eager(_tokens(2, 5)))


def test_a_call_the_compiled_graphs_refuse_runs_eager_and_is_logged(
    app_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, _ = clip_model.load(app_model)
    text = CompiledText(model.eval(), 1, clip_model.TextInput.of(model))

    def refuses(tokens: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("Detected recompile when torch.compile stance is 'fail_on_recompile'")

    text._compiled = refuses  # what a recompile under fail_on_recompile does
    with caplog.at_level(logging.WARNING, logger="app.compiled"), torch.inference_mode():
        assert torch.equal(text.encode(_tokens(3, 4)), text.eager(_tokens(3, 4)))
        text.encode(_tokens(3, 4))
    assert len([r for r in caplog.records if "does not cover" in r.getMessage()]) == 1  # once per shape


@pytest.mark.slow  # heavy end to end (seconds): CI runs it, make check leaves it out
def test_the_encoder_serves_from_the_compiled_tower_on_its_inference_thread(
    app_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # as the server runs it: the inference thread on 2 threads, every other thread (the compiler's too) on 1
    from app.encoder import Encoder
    from app.metrics import Metrics
    from indexer.store import ModelInfo

    model, preprocess = clip_model.load(app_model)
    model = clip_model.pack_for_cpu(model)  # as the fp32 server loads it
    info = ModelInfo.of("tiny", "sha", model.config.embed_dim, preprocess.image_size, preprocess.mean, preprocess.std)
    original = default_thread_count()
    single_threaded_elsewhere()  # Runtime.start does this first
    encoder = Encoder(
        model, preprocess, info, Metrics(), plan=ThreadPlan.for_serving(2), compile_text=True, text_cache_size=0
    )
    try:
        for _ in range(600):
            if encoder.text_tower.ready or "failed" in encoder.text_tower.status:
                break
            time.sleep(0.5)
        assert encoder.text_tower.ready, encoder.text_tower.status
        with caplog.at_level(logging.WARNING, logger="app.compiled"):
            vectors = [e.vector for e in encoder.encode_texts(["a cat", "two dogs in the snow", "red"])]
            vectors += [encoder.encode_texts(["a single query"])[0].vector]
        assert all(abs(float((v**2).sum()) - 1) < 1e-4 for v in vectors)
        assert not [r for r in caplog.records if "does not cover" in r.getMessage()]  # the graphs served them
    finally:
        encoder.close()
        torch.set_num_threads(original)
