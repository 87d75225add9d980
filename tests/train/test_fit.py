"""clip-train fit: training from scratch and fine-tuning, exact resume, 2-process torchrun parity, optimizer setup."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import clip_model
from clip_model.config import CLIPConfig, TextConfig, VisionConfig
from clip_model.errors import UnknownModelError
from clip_model.loss import clip_loss
from clip_model.tokenizer import trim_tokens
from clip_model.train import cli
from clip_model.train.data import DatasetError, Pair, PairDataset, read_pairs
from clip_model.train.fit import (
    CHECKPOINT_DIR,
    ContrastiveModule,
    FitError,
    FitOptions,
    StepBatchSampler,
    _World,
    fit,
    split_pairs,
)
from clip_model.train.schedule import lr_factor, param_groups, warmup_cosine
from tests.support import TINY_ARCH, free_port

from .conftest import SHAPES_COUNT

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20
BATCH = 16
RECALL_KEYS = {f"{d}_recall@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)}
BASE_KEYS = {"step", "loss", "lr", "logit_scale", "samples_per_s"}
DDP_LOSS_RTOL = 1e-5  # 2 gloo processes vs 1: the global loss differs only by float32 rounding (seen: 5e-7)
DDP_WEIGHT_ATOL = 1e-4  # Adam turns rounding noise in zero-mean gradients (attention key biases) into ~1e-5 moves


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a small shared CPU, a second OpenMP thread waiting on a busy core makes steps ~100x
    slower, and these models are too small to gain from it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def options(data: Path, model: Path | str, out: Path, **changes: object) -> FitOptions:
    """Small, fast, deterministic runs: no evaluation or loader workers unless a test asks for them."""
    base = FitOptions(
        data=data, model=str(model), out_dir=out, steps=STEPS, batch_size=BATCH, lr=1e-3, warmup_steps=3,
        eval_every=0, save_every=0, log_every=1, val_fraction=0.0, num_workers=0,
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]  # test-chosen fields


def records(out: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def straight(shapes_data: Path, tiny_arch_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 20-step run from scratch, checkpoints every 4 steps."""
    out = tmp_path_factory.mktemp("straight")
    fit(options(shapes_data, tiny_arch_file, out, save_every=4))
    return out


def test_training_from_scratch_lowers_the_loss_evaluates_and_saves_a_loadable_model(
    shapes_data: Path, tiny_arch_file: Path, tmp_path: Path
) -> None:
    result = fit(options(shapes_data, tiny_arch_file, tmp_path, steps=30, val_fraction=0.25, eval_every=10))
    logged = records(tmp_path)
    assert [r["step"] for r in logged] == list(range(1, 31))
    assert all(BASE_KEYS <= r.keys() for r in logged)
    evaluated = [r["step"] for r in logged if RECALL_KEYS <= r.keys() and "zero_shot_accuracy_photo" in r]
    assert evaluated == [10, 20, 30]
    losses = [r["loss"] for r in logged]
    assert sum(losses[-5:]) < 0.75 * sum(losses[:5]), losses
    assert result.step == 30 and result.metrics == logged[-1]
    assert result.model_path == tmp_path / "model.safetensors"
    model, preprocess = clip_model.load(result.model_path)
    assert model.config.to_dict() == CLIPConfig.from_dict(TINY_ARCH).to_dict()
    pixels, tokens = PairDataset(read_pairs(shapes_data)[:1], preprocess)[0]  # the loaded model encodes both
    assert model.encode_image(pixels[None], normalize=True).shape == (1, TINY_ARCH["embed_dim"])
    assert model.encode_text(tokens[None], normalize=True).shape == (1, TINY_ARCH["embed_dim"])


def test_resumed_run_reproduces_the_uninterrupted_one_exactly(
    straight: Path, shapes_data: Path, tiny_arch_file: Path, tmp_path: Path
) -> None:
    first = fit(options(shapes_data, tiny_arch_file, tmp_path, save_every=4, stop_after=10))
    assert first.step == 10
    checkpoints = tmp_path / CHECKPOINT_DIR
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000008.pt", "step-000010.pt"]  # last 2 kept
    (checkpoints / "step-000010.pt").unlink()  # as if killed after step 10: steps 9-10 are logged but not saved
    fit(options(shapes_data, tiny_arch_file, tmp_path, save_every=4, resume=True))
    resumed, uninterrupted = records(tmp_path), records(straight)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # no step logged twice
    assert [(r["loss"], r["lr"]) for r in resumed] == [(r["loss"], r["lr"]) for r in uninterrupted]
    final, expected = load_file(tmp_path / "model.safetensors"), load_file(straight / "model.safetensors")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000016.pt", "step-000020.pt"]


def test_preloaded_images_train_exactly_as_images_decoded_each_step(
    straight: Path, shapes_data: Path, tiny_arch_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="clip_model.train.fit"):
        fit(options(shapes_data, tiny_arch_file, tmp_path, preload_mb=0, num_workers=1))
    assert "decoding images per step" in caplog.text
    assert "images (" not in caplog.text  # no "preloaded N images (M MiB)"
    per_step, preloaded = records(tmp_path), records(straight)  # straight: the default, which preloads
    assert [r["loss"] for r in per_step] == [r["loss"] for r in preloaded]
    final, expected = load_file(tmp_path / "model.safetensors"), load_file(straight / "model.safetensors")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="clip_model.train.fit"):
        fit(options(shapes_data, tiny_arch_file, tmp_path / "again", steps=1))
    assert f"preloaded {SHAPES_COUNT} images" in caplog.text


def test_training_checkpoint_reads_weights_only_and_loads_as_a_model(straight: Path) -> None:
    path = straight / CHECKPOINT_DIR / "step-000020.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["step"] == STEPS and json.loads(state["options"])["steps"] == STEPS
    assert {"model", "config", "optimizer", "scheduler", "rng", "extra"} <= state.keys()
    model, _ = clip_model.load(path)
    final = load_file(straight / "model.safetensors")
    assert all(torch.equal(value, final[key]) for key, value in model.state_dict().items())


@pytest.mark.slow  # heavy end to end (seconds): CI runs it, make check leaves it out
def test_two_torchrun_processes_match_one_process_with_the_same_global_batch(
    straight: Path, shapes_data: Path, tiny_arch_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    command = [
        *launcher, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "clip_model.train", "fit", "--data", str(shapes_data), "--model", str(tiny_arch_file),
        "--out", str(tmp_path), "--steps", str(STEPS), "--batch-size", str(BATCH), "--lr", "1e-3", "--warmup", "3",
        "--eval-every", "0", "--save-every", "0", "--log-every", "1", "--val-fraction", "0", "--workers", "0",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = records(tmp_path), records(straight)
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(two, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=DDP_LOSS_RTOL)
    final, expected = load_file(tmp_path / "model.safetensors"), load_file(straight / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=DDP_WEIGHT_ATOL, msg=key)


def test_fine_tuning_starts_from_the_checkpoint_weights(shapes_data: Path, tmp_path: Path) -> None:
    pretrained, preprocess = clip_model.create_model(CLIPConfig.from_dict(TINY_ARCH), seed=3)
    path = clip_model.save_checkpoint(pretrained, tmp_path / "pretrained.safetensors")
    result = fit(options(shapes_data, path, tmp_path / "run", steps=2))
    pairs = read_pairs(shapes_data)
    first_batch = next(iter(StepBatchSampler(len(pairs), BATCH, seed=0, start=0, stop=1, world=_World())))
    batch = [PairDataset(pairs, preprocess)[i] for i in first_batch]
    images, tokens = torch.stack([b[0] for b in batch]), trim_tokens(torch.stack([b[1] for b in batch]))
    with torch.no_grad():
        image_features = F.normalize(pretrained.encode_image(images), dim=-1)
        text_features = F.normalize(pretrained.encode_text(tokens), dim=-1)
        expected = clip_loss(image_features, text_features, pretrained.logit_scale).item()
    assert records(result.out_dir)[0]["loss"] == pytest.approx(expected, abs=1e-6)


def test_siglip_trains_its_bias_and_gradient_checkpointing_changes_nothing(
    straight: Path, shapes_data: Path, tiny_arch_file: Path, tmp_path: Path
) -> None:
    fit(options(shapes_data, tiny_arch_file, tmp_path / "ckpt", grad_checkpointing=True, stop_after=3))
    losses = [r["loss"] for r in records(tmp_path / "ckpt")]
    assert losses == pytest.approx([r["loss"] for r in records(straight)[:3]], abs=1e-6)

    result = fit(options(shapes_data, tiny_arch_file, tmp_path / "siglip", loss="siglip", steps=3))
    logged = records(tmp_path / "siglip")
    assert all(math.isfinite(r["loss"]) and "logit_bias" in r for r in logged)
    assert logged[0]["logit_scale"] == pytest.approx(10.0, rel=1e-2)  # SigLIP's initial temperature
    state = torch.load(result.checkpoint_path, map_location="cpu", weights_only=True)
    assert state["extra"]["logit_bias"].item() == pytest.approx(logged[-1]["logit_bias"])
    assert "logit_bias" not in load_file(result.model_path)  # the CLIP checkpoint holds only CLIP weights


def tiny_resnet() -> CLIPConfig:
    vision = VisionConfig(image_size=32, layers=(1, 1, 1, 1), width=8, heads=4)
    return CLIPConfig(embed_dim=16, vision=vision, text=TextConfig(width=32, heads=2, layers=1))


@pytest.mark.parametrize("config", [CLIPConfig.from_dict(TINY_ARCH), tiny_resnet()], ids=["vit", "resnet"])
def test_weight_decay_spares_gains_biases_embeddings_and_temperature(config: CLIPConfig) -> None:
    model, _ = clip_model.create_model(config, seed=0)
    module = ContrastiveModule(model, "siglip")
    decay, no_decay = param_groups(module, weight_decay=0.2)
    assert (decay["name"], decay["weight_decay"], no_decay["name"], no_decay["weight_decay"]) == (
        "decay", 0.2, "no_decay", 0.0
    )  # fmt: skip
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert decayed | spared == set(names.values()) and not decayed & spared
    always_spared = {"model.token_embedding.weight", "model.positional_embedding", "model.logit_scale", "logit_bias"}
    assert always_spared <= spared
    assert {"model.text_projection", "model.transformer.resblocks.0.attn.in_proj_weight"} <= decayed
    assert all(module.get_parameter(n).ndim >= 2 for n in decayed)
    assert not any(n.endswith(("bias", "ln_final.weight")) or ".bn" in n or "ln_" in n for n in decayed)
    if config.vision.is_resnet:
        assert {"model.visual.attnpool.positional_embedding", "model.visual.bn1.weight"} <= spared
        assert "model.visual.conv1.weight" in decayed
    else:
        assert {"model.visual.class_embedding", "model.visual.positional_embedding"} <= spared
        assert {"model.visual.conv1.weight", "model.visual.proj"} <= decayed


def test_schedule_warms_up_linearly_then_decays_along_a_cosine_to_zero() -> None:
    warmup, total = 10, 110
    assert [lr_factor(s, warmup, total) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, warmup, total) == pytest.approx(1.0)
    assert lr_factor(60, warmup, total) == pytest.approx(0.5)
    assert lr_factor(35, warmup, total) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(110, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 0, total) == pytest.approx(1.0)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2, 2))], lr=0.5)
    scheduler = warmup_cosine(optimizer, warmup, total)
    seen = []
    for _ in range(12):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.5 * lr_factor(s, warmup, total) for s in range(12)])


def global_batches(seed: int, start: int, stop: int, world: _World | None = None) -> list[list[int]]:
    """The batches of steps ``[start, stop)`` over ``SHAPES_COUNT`` pairs, as ``fit`` draws them."""
    return list(StepBatchSampler(SHAPES_COUNT, BATCH, seed, start, stop, world or _World()))


def test_data_order_is_a_function_of_seed_and_step_and_the_split_of_nothing_else() -> None:
    first = global_batches(seed=0, start=0, stop=4)  # one epoch
    assert sorted(i for batch in first for i in batch) == list(range(SHAPES_COUNT))
    assert global_batches(seed=0, start=4, stop=5)[0] != first[0]  # a new permutation each epoch
    assert global_batches(seed=1, start=0, stop=1)[0] != first[0]
    assert global_batches(seed=0, start=2, stop=6) == [*first[2:], *global_batches(seed=0, start=4, stop=6)]  # resume
    halves = [global_batches(seed=0, start=0, stop=4, world=_World(rank, 2)) for rank in (0, 1)]
    assert [a + b for a, b in zip(*halves, strict=True)] == first  # each rank takes its slice of the global batch
    pairs = [Pair(Path(f"{i}.png"), f"caption {i}") for i in range(40)]
    train, val = split_pairs(pairs, 0.25)
    assert len(val) == 10 and len(train) == 30 and split_pairs(pairs, 0.25) == (train, val)


def test_bad_inputs_fail_with_clear_errors(
    straight: Path, shapes_data: Path, tiny_arch_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        fit(options(tmp_path / "missing", tiny_arch_file, tmp_path / "a"))
    with pytest.raises(UnknownModelError, match="not an architecture"):
        fit(options(shapes_data, "no-such-model", tmp_path / "b"))
    with pytest.raises(DatasetError, match="larger than the 64 training pairs"):
        fit(options(shapes_data, tiny_arch_file, tmp_path / "c", batch_size=128))
    with pytest.raises(FitError, match="steps must be >= 1"):
        fit(options(shapes_data, tiny_arch_file, tmp_path / "d", steps=0))
    with pytest.raises(FitError, match="preload_mb must be >= 0, got -1"):
        fit(options(shapes_data, tiny_arch_file, tmp_path / "d", preload_mb=-1))
    with pytest.raises(FitError, match="--resume: no training checkpoint"):
        fit(options(shapes_data, tiny_arch_file, tmp_path / "e", resume=True))
    with pytest.raises(FitError, match="already holds training checkpoints"):
        fit(options(shapes_data, tiny_arch_file, straight))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(FitError, match="batch size 16 is not divisible by the 3 processes"):
        fit(options(shapes_data, tiny_arch_file, tmp_path / "f"))


def test_command_line_reports_errors_and_documents_every_flag(
    tmp_path: Path, tiny_arch_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["fit", "--data", str(tmp_path / "missing"), "--model", str(tiny_arch_file), "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    with pytest.raises(SystemExit) as exited:
        cli.main(["fit", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    flags = "--data --captions --val-data --val-fraction --model --out --steps --batch-size --lr --weight-decay"
    flags += " --warmup --eval-every --save-every --loss --precision --grad-checkpointing --seed --workers --resume"
    assert all(flag in text for flag in flags.split())
