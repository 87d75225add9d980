"""clip-train finetune: LoRA and full runs through fit's loop, outputs and provenance, layer-wise rates, frozen
towers, every family, bad input refused before any step."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

import clip_model
from app.main import create_app
from clip_model.config import CLIPConfig, SigLIPConfig, XLMRobertaCLIPConfig
from clip_model.train import cli
from clip_model.train.data import DatasetError, PairDataset, read_pairs
from clip_model.train.finetune import FinetuneOptions, finetune, read_provenance
from clip_model.train.fit import FitError, FitOptions
from clip_model.train.layers import freeze_towers, hold_frozen_batch_norm, layer_decay_groups
from clip_model.train.lora import LoRAConfig, load_adapter, read_adapter
from tests.app.conftest import build_folder
from tests.clip_model.sentencepiece_models import train_gemma_model, train_siglip_model, train_xlm_roberta_model
from tests.support import TINY_ARCH, free_port, save_tiny_model

from .conftest import SHAPES_COUNT, write_shapes
from .test_lora import FAMILIES

STEPS = 8
BATCH = 16
RECALLS = [f"{d}_recall@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)]
ZERO_SHOT = ["zero_shot_accuracy_ensemble80", "zero_shot_accuracy_photo", "zero_shot_accuracy_plain"]
MERGE_ATOL = 1e-5
DDP_WEIGHT_ATOL = 1e-4  # 2 gloo processes vs 1 (as test_fit's): rounding noise through Adam
REPO = Path(__file__).resolve().parents[2]
VOCABULARY = 1000  # token embeddings of the SentencePiece families: more than the test vocabularies' pieces


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "tiny.safetensors", seed=0)


def options(data: Path, model: Path | str, out: Path, **changes: object) -> FinetuneOptions:
    """A short run: 8 steps of 16 pairs, a quarter of the pairs held out, no loader processes."""
    fit = FitOptions(
        data=data, model=str(model), out_dir=out, steps=STEPS, batch_size=BATCH, lr=5e-3, warmup_steps=2,
        eval_every=0, save_every=0, log_every=1, val_fraction=0.25, num_workers=0,
    )  # fmt: skip
    fit_changes = {k: v for k, v in changes.items() if k in {f.name for f in dataclasses.fields(FitOptions)}}
    run = FinetuneOptions(dataclasses.replace(fit, **fit_changes), lora=LoRAConfig(rank=4))  # type: ignore[arg-type]
    return dataclasses.replace(run, **{k: v for k, v in changes.items() if k not in fit_changes})  # type: ignore[arg-type]


def lora_argv(base_model: Path, data: Path, out: Path) -> list[str]:
    argv = ["finetune", "--model", str(base_model), "--data", str(data), "--out", str(out)]
    argv += ["--steps", str(STEPS), "--batch-size", str(BATCH), "--lr", "5e-3", "--warmup", "2", "--lora-rank", "4"]
    return [*argv, "--val-fraction", "0.25", "--workers", "0", "--eval-every", "4", "--log-every", "1"]


@pytest.fixture(scope="module")
def lora_run(shapes_data: Path, base_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run through the command line (its stdout saved as stdout.txt)."""
    out = tmp_path_factory.mktemp("lora")
    argv = lora_argv(base_model, shapes_data, out / "run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # the command's thread plan: one, as the module's other runs
        assert cli.main(argv) == 0
    (out / "run" / "stdout.txt").write_text(printed.getvalue(), encoding="utf-8")
    return out / "run"


def embeddings(model: clip_model.ImageTextModel, data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings of the first 4 images and captions of ``data``."""
    dataset = PairDataset(read_pairs(data)[:4], clip_model.preprocess_for(model.config))
    pixels, tokens = (torch.stack(column) for column in zip(*(dataset[i] for i in range(4)), strict=True))
    with torch.no_grad():
        return model.encode_image(pixels, normalize=True), model.encode_text(tokens, normalize=True)


def test_lora_run_writes_a_loadable_merged_model_adapters_and_the_evaluation(
    lora_run: Path, base_model: Path, shapes_data: Path
) -> None:
    report = json.loads((lora_run / "evaluation.json").read_text(encoding="utf-8"))
    assert list(report["before"]) == RECALLS + ZERO_SHOT and list(report["after"]) == RECALLS + ZERO_SHOT
    assert report["before"] != report["after"] and report["held_out_pairs"] == SHAPES_COUNT // 4
    assert 0 < report["trainable_parameters"] < 0.01 * report["total_parameters"]
    assert report["train_seconds"] > 0 and report["peak_memory_mib"] > 0
    printed = (lora_run / "stdout.txt").read_text(encoding="utf-8")
    assert "metric" in printed and "before" in printed and "text->image recall@1" in printed
    assert f"{report['trainable_parameters']:,} of {report['total_parameters']:,} parameters trained" in printed
    metrics = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1)) and "text_to_image_recall@1" in metrics[3]

    tuned, _ = clip_model.load(lora_run / "model.safetensors")
    base, _ = clip_model.load(base_model)
    assert tuned.state_dict().keys() == base.state_dict().keys()
    provenance = read_provenance(lora_run / "model.safetensors")
    assert provenance is not None and provenance["base_model"] == str(base_model.resolve())
    assert provenance["base_weights_sha256"] == clip_model.weights_sha256(base) != clip_model.weights_sha256(tuned)
    assert provenance["method"] == "lora" and provenance["lora"]["rank"] == 4 and len(provenance["data_sha256"]) == 64
    assert read_provenance(base_model) is None

    load_adapter(base, lora_run / "adapter.safetensors")  # the base plus the saved adapters, unmerged
    assert read_adapter(lora_run / "adapter.safetensors").extra == provenance
    for merged, unmerged in zip(embeddings(tuned, shapes_data), embeddings(base, shapes_data), strict=True):
        torch.testing.assert_close(merged, unmerged, rtol=0, atol=MERGE_ATOL)


@pytest.mark.slow
def test_two_torchrun_processes_fine_tune_as_one(
    lora_run: Path, shapes_data: Path, base_model: Path, tmp_path: Path
) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    command = [*launcher, "--nnodes", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), "-m", "clip_model.train"]  # fmt: skip
    command += lora_argv(base_model, shapes_data, tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = load_file(tmp_path / "two" / "adapter.safetensors"), load_file(lora_run / "adapter.safetensors")
    assert two.keys() == one.keys()
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=0, atol=DDP_WEIGHT_ATOL, msg=key)
    assert "text->image recall@1" in done.stdout  # rank 0 alone prints the table


def test_an_index_of_the_base_model_is_refused_by_a_server_pinned_to_the_fine_tuned_one(
    lora_run: Path, base_model: Path, tmp_path: Path
) -> None:
    indexed = build_folder(tmp_path, base_model)
    settings = indexed.settings(tmp_path, model=str(lora_run / "model.safetensors"))
    with TestClient(create_app(settings, watch=False)) as client:
        ready = client.get("/readyz")
    assert ready.status_code == 503 and "clip-index build --rebuild" in ready.json()["reason"]


def test_an_occupied_out_is_refused_unless_overwritten_and_a_resume_must_repeat_the_options(
    lora_run: Path, shapes_data: Path, base_model: Path, tmp_path: Path
) -> None:
    with pytest.raises(FitError, match="already holds files: pass --overwrite"):
        finetune(options(shapes_data, base_model, lora_run))
    with pytest.raises(FitError, match="other fine-tuning options"):
        finetune(options(shapes_data, base_model, lora_run, resume=True, method="full"))
    out = tmp_path / "again"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-000004.pt").write_bytes(b"an older run")
    (out / "keep.txt").write_text("not ours")
    finetune(options(shapes_data, base_model, out, steps=2, overwrite=True))
    assert (out / "model.safetensors").is_file() and (out / "keep.txt").is_file()
    assert not (out / "checkpoints" / "step-000004.pt").exists()


def test_a_resumed_lora_run_ends_where_the_uninterrupted_one_does(
    shapes_data: Path, base_model: Path, tmp_path: Path
) -> None:
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    finetune(options(shapes_data, base_model, straight, save_every=3))
    finetune(options(shapes_data, base_model, cut, save_every=3, stop_after=3))
    finetune(options(shapes_data, base_model, cut, save_every=3, resume=True))
    done, expected = load_file(cut / "adapter.safetensors"), load_file(straight / "adapter.safetensors")
    assert done.keys() == expected.keys() and all(torch.equal(done[k], expected[k]) for k in expected)


def test_full_fine_tuning_with_a_frozen_image_tower_changes_only_the_text_tower(
    shapes_data: Path, base_model: Path, tmp_path: Path
) -> None:
    report = finetune(options(shapes_data, base_model, tmp_path / "full", method="full", freeze=("image",)))
    assert report.adapter_path is None and not (tmp_path / "full" / "adapter.safetensors").exists()
    before, after = load_file(base_model), load_file(tmp_path / "full" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith("visual.") for k in changed)
    assert {"token_embedding.weight", "text_projection", "logit_scale"} <= changed
    assert report.trainable_parameters == sum(v.numel() for k, v in before.items() if not k.startswith("visual."))


def test_layer_decay_gives_each_depth_its_rate() -> None:
    lr, decay = 1.0, 0.5
    model, _ = clip_model.create_model(CLIPConfig.from_dict(TINY_ARCH), seed=0)  # 2 blocks a tower: top depth 3
    rates = {id(p): g["lr"] for g in layer_decay_groups(model, lr, 0.1, decay) for p in g["params"]}
    expected = {
        "visual.conv1.weight": decay**3, "visual.class_embedding": decay**3, "visual.ln_pre.weight": decay**3,
        "visual.transformer.resblocks.0.attn.in_proj_weight": decay**2,
        "visual.transformer.resblocks.1.mlp.c_fc.bias": decay,
        "visual.ln_post.weight": 1.0, "visual.proj": 1.0, "token_embedding.weight": decay**3,
        "positional_embedding": decay**3, "transformer.resblocks.0.ln_1.weight": decay**2,
        "transformer.resblocks.1.attn.out_proj.weight": decay, "text_projection": 1.0, "logit_scale": 1.0,
    }  # fmt: skip
    assert {name: rates[id(model.get_parameter(name))] for name in expected} == expected
    assert len(rates) == len(list(model.parameters()))

    resnet, _ = clip_model.create_model(FAMILIES["clip-resnet"], seed=0)  # 4 bottlenecks: top depth 5
    rates = {id(p): g["lr"] for g in layer_decay_groups(resnet, lr, 0.1, decay) for p in g["params"]}
    for name, rate in {"visual.bn2.weight": decay**5, "visual.layer1.0.conv1.weight": decay**4,
                       "visual.layer4.0.bn3.bias": decay, "visual.attnpool.q_proj.weight": 1.0}.items():  # fmt: skip
        assert rates[id(resnet.get_parameter(name))] == rate, name

    xlmr, _ = clip_model.create_model(FAMILIES["xlm-roberta"], seed=0)  # 2 text layers, 1 image block
    rates = {id(p): g["lr"] for g in layer_decay_groups(xlmr, lr, 0.1, decay) for p in g["params"]}
    for name, rate in {"text.transformer.embeddings.word_embeddings.weight": decay**3,
                       "text.transformer.encoder.layer.1.output.dense.weight": decay, "text.proj.0.weight": 1.0,
                       "visual.transformer.resblocks.0.mlp.c_fc.weight": decay}.items():  # fmt: skip
        assert rates[id(xlmr.get_parameter(name))] == rate, name


def test_a_frozen_resnet_tower_keeps_its_batch_norm_statistics() -> None:
    model, _ = clip_model.create_model(FAMILIES["clip-resnet"], seed=0)
    freeze_towers(model, ("image",))
    assert hold_frozen_batch_norm(model) > 0
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()(torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4, 77)))
    assert all(torch.equal(stats[k], model.state_dict()[k]) for k in stats)


@pytest.mark.parametrize("family", ["siglip", "xlm-roberta", "clip-resnet"])
def test_every_family_fine_tunes_with_its_tokenizer_and_saves_a_loadable_model(
    family: str, shapes_data: Path, tmp_path: Path
) -> None:
    config = FAMILIES[family]
    if isinstance(config, SigLIPConfig):
        train_vocabulary = train_gemma_model if config.tokenizer == "siglip2" else train_siglip_model
    elif isinstance(config, XLMRobertaCLIPConfig):
        train_vocabulary = train_xlm_roberta_model
    (tmp_path / "base").mkdir()
    if not isinstance(config, CLIPConfig):  # a SentencePiece vocabulary beside the weights, as published
        train_vocabulary(tmp_path / "base")
        text = dataclasses.replace(config.text, vocab_size=VOCABULARY)
        config = dataclasses.replace(config, text=text)  # type: ignore[arg-type]  # each config with its text type
    model, _ = clip_model.create_model(config, seed=0)
    base = clip_model.save_checkpoint(model.eval(), tmp_path / "base" / "model.safetensors")
    report = finetune(options(shapes_data, base, tmp_path / "out", steps=3, val_fraction=0.25))
    tuned, _ = clip_model.load(report.model_path)
    assert type(tuned) is type(model) and set(report.after) >= set(RECALLS)
    if isinstance(config, SigLIPConfig | XLMRobertaCLIPConfig):
        assert clip_model.tokenizer_for(tuned)(["a red circle"], context_length=tuned.context_length).shape[0] == 1
    if isinstance(config, SigLIPConfig):
        assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])["logit_bias"] != 0


def test_bad_input_is_refused_before_any_step(
    shapes_data: Path, base_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_shapes(tmp_path / "data", 40)
    (data / "uncaptioned.png").write_bytes((data / "000.png").read_bytes())
    (data / "more" / "b.jpg").parent.mkdir()
    (data / "more" / "b.jpg").write_bytes((data / "001.png").read_bytes())
    with pytest.raises(DatasetError, match=r"2 of the 42 images in .* have no caption \(first: more/b\.jpg\)"):
        finetune(options(data, base_model, tmp_path / "a"))
    (data / "uncaptioned.png").unlink()
    (data / "more" / "b.jpg").unlink()
    (data / "003.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=r"1 of the 40 images do not decode \(first: .*003\.png"):
        finetune(options(data, base_model, tmp_path / "b"))
    with pytest.raises(DatasetError, match="batch size 64 is larger than the 48 training pairs"):
        finetune(options(shapes_data, base_model, tmp_path / "c", batch_size=64))
    with pytest.raises(ValueError, match=r"LoRA rank \(--lora-rank\) 100 is larger"):
        finetune(options(shapes_data, base_model, tmp_path / "d", lora=LoRAConfig(rank=100)))
    with pytest.raises(ValueError, match=r"--lora-targets\) 'attn' matches no projection"):
        finetune(options(shapes_data, base_model, tmp_path / "d", lora=LoRAConfig(targets=("attn",))))
    with pytest.raises(FitError, match="held-out pairs"):
        finetune(options(shapes_data, base_model, tmp_path / "e", val_fraction=0.0))
    with pytest.raises(FitError, match="--freeze takes one tower"):
        finetune(options(shapes_data, base_model, tmp_path / "f", freeze=("image", "text")))
    with pytest.raises(FitError, match="steps must be >= 1"):
        finetune(options(shapes_data, base_model, tmp_path / "h", steps=0))
    assert not any((tmp_path / name).exists() for name in "abcdefh")  # nothing written, no step taken
    with caplog.at_level(logging.ERROR):
        argv = ["finetune", "--model", str(base_model), "--data", str(data), "--out", str(tmp_path / "g")]
        argv += ["--batch-size", str(BATCH)]
        assert cli.main(argv) == 1
    assert "do not decode" in caplog.text
