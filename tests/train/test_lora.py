"""LoRA adapters: exact start, frozen base, merge equal to the adapted model in every family, adapter files, errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import clip_model
from clip_model.config import (
    CLIPConfig,
    ModelConfig,
    SigLIPConfig,
    TextConfig,
    VisionConfig,
    XLMRobertaCLIPConfig,
    XLMRobertaTextConfig,
    get_config,
)
from clip_model.errors import CheckpointError
from clip_model.model import ImageTextModel
from clip_model.train.lora import (
    KINDS,
    LoRAConfig,
    adapted_modules,
    apply_lora,
    kind_of,
    load_adapter,
    merge_lora,
    parameter_counts,
    read_adapter,
    save_adapter,
    tower_of,
)
from tests.support import TINY_ARCH

MERGE_ATOL = 1e-5  # unit embeddings of the merged model vs the adapted one (the bound)
B_STD = 0.05  # random up-projections, so that the adapters change what the model computes

FAMILIES: dict[str, ModelConfig] = {
    "clip-vit": CLIPConfig.from_dict(TINY_ARCH),
    "clip-resnet": CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, layers=(1, 1, 1, 1), width=8, heads=4),
        text=TextConfig(width=32, heads=2, layers=2),
    ),
    "siglip": SigLIPConfig(
        embed_dim=64,
        vision=VisionConfig(image_size=32, layers=2, width=64, heads=4, patch_size=8, mlp_width=96),
        text=TextConfig(width=48, heads=4, layers=2, context_length=16, vocab_size=100, mlp_width=80),
        tokenizer="siglip2",
    ),
    "xlm-roberta": XLMRobertaCLIPConfig(
        embed_dim=32,
        vision=VisionConfig(image_size=32, layers=1, width=64, heads=2, patch_size=16, mlp_width=128),
        text=XLMRobertaTextConfig(width=64, heads=2, layers=2, mlp_width=128, vocab_size=120),
    ),
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(config: ModelConfig, seed: int = 0) -> ImageTextModel:
    model, _ = clip_model.create_model(config, seed=seed)
    return model.eval()


def inputs(model: ImageTextModel, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [B, 3, R, R] and token rows as the model's tokenizer writes them (random ids)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, model.image_size, model.image_size, generator=gen)
    length, vocab = model.context_length, model.config.text.vocab_size
    tokens = torch.randint(4, vocab - 1, (batch, length), generator=gen)
    if isinstance(model.config, XLMRobertaCLIPConfig):
        tokens[:, 0], tokens[:, 6], tokens[:, 7:] = 0, 2, 1  # <s> ids </s> <pad>...
    elif isinstance(model.config, CLIPConfig):
        tokens[:, 5], tokens[:, 6:] = vocab - 1, 0  # the end-of-text token is the largest id
    return images, tokens


def embeddings(model: ImageTextModel, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.encode_image(batch[0], normalize=True), model.encode_text(batch[1], normalize=True)


def randomize_up_projections(model: torch.nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapted_modules(model).values():
            adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * B_STD)


def assert_merge_matches(model: ImageTextModel) -> None:
    """Adapters with random B change both towers; merging gives the same embeddings and the base's keys."""
    batch = inputs(model)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    base = embeddings(model, batch)
    apply_lora(model, LoRAConfig(rank=4))
    randomize_up_projections(model)
    adapted = embeddings(model, batch)
    for before, after in zip(base, adapted, strict=True):
        assert (before - after).abs().max() > 1e-3  # the adapters act on both towers
    merge_lora(model)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == keys
    merged = embeddings(model, batch)
    for unmerged, folded in zip(adapted, merged, strict=True):
        torch.testing.assert_close(folded, unmerged, rtol=0, atol=MERGE_ATOL)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_kind_is_found_in_both_towers(family: str) -> None:
    model = build(FAMILIES[family])
    names = apply_lora(model, LoRAConfig(rank=2))
    found = {(tower_of(name), kind_of(name)) for name in names}
    image_kinds = ("q", "k", "v", "out") if family == "clip-resnet" else KINDS  # its attention pool has no MLP
    assert found == {("image", kind) for kind in image_kinds} | {("text", kind) for kind in KINDS}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merged_model_computes_what_the_adapted_one_did(family: str) -> None:
    assert_merge_matches(build(FAMILIES[family]))


@pytest.mark.slow
def test_merged_vit_b_32_sized_model_computes_what_the_adapted_one_did() -> None:
    assert_merge_matches(build(get_config("ViT-B-32")))


def test_zero_initialised_adapters_compute_exactly_the_base_model() -> None:
    model = build(FAMILIES["clip-vit"])
    batch = inputs(model)
    base = embeddings(model, batch)
    apply_lora(model, LoRAConfig(rank=8, dropout=0.5))
    for before, after in zip(base, embeddings(model, batch), strict=True):
        assert torch.equal(before, after)


def test_the_seed_alone_decides_the_adapters() -> None:
    drawn: list[torch.Tensor] = []
    for seed in (3, 3, 4):
        model = build(FAMILIES["clip-vit"])
        torch.manual_seed(len(drawn))  # the global generator plays no part
        apply_lora(model, LoRAConfig(rank=2), seed=seed)
        drawn.append(torch.cat([a.lora_A.flatten() for a in adapted_modules(model).values()]))
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


def test_only_the_adapters_train_and_the_trainable_share_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    model = build(FAMILIES["clip-vit"])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="clip_model.train.lora"):
        names = apply_lora(model, LoRAConfig(rank=4))
    trainable, total = parameter_counts(model)
    image_block = 4 * (4 * (64 + 64)) + 2 * (4 * (64 + 128))  # rank 4: q, k, v, out (64 -> 64); fc, proj (64, 128)
    text_block = 4 * (4 * (64 + 64)) + 2 * (4 * (64 + 256))  # the text MLP is 4 x 64 wide
    assert len(names) == 24 and trainable == 2 * image_block + 2 * text_block  # 2 blocks a tower
    assert f"{trainable} of {total} parameters trainable ({100 * trainable / total:.2f}%)" in caplog.text
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    images, tokens = inputs(model)
    for _ in range(2):
        loss = model(images, tokens)[0].logsumexp(dim=1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    merged = merge_lora(model).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all(k.endswith("weight") for k in changed)  # adapters fold into weights, nothing else moved
    assert not any(k.endswith(("bias", "embedding", "logit_scale")) for k in changed)


def test_a_fused_slice_merges_into_its_own_rows_only() -> None:
    model = build(FAMILIES["clip-vit"])
    before = model.get_parameter("transformer.resblocks.1.attn.in_proj_weight").detach().clone()  # [3W, W]
    names = apply_lora(model, LoRAConfig(rank=2, targets=("transformer.resblocks.1.attn.v",)))
    assert names == ["transformer.resblocks.1.attn.v"]
    randomize_up_projections(model)
    after = merge_lora(model).get_parameter("transformer.resblocks.1.attn.in_proj_weight")
    width = before.shape[1]
    assert torch.equal(after[: 2 * width], before[: 2 * width])  # q and k rows untouched
    assert not torch.equal(after[2 * width :], before[2 * width :])


def test_patterns_and_towers_choose_the_targets() -> None:
    model = build(FAMILIES["clip-vit"])
    names = apply_lora(model, LoRAConfig(rank=2, targets=("fc", "*.resblocks.0.attn.q"), towers=("text",)))
    assert names == [
        "transformer.resblocks.0.attn.q",
        "transformer.resblocks.0.mlp.c_fc",
        "transformer.resblocks.1.mlp.c_fc",
    ]


def test_adapter_file_round_trips_and_refuses_other_base_weights(tmp_path: Path) -> None:
    config = LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=("q", "v", "fc"))
    model = build(FAMILIES["siglip"])
    base_sha = clip_model.weights_sha256(model)
    apply_lora(model, config)
    randomize_up_projections(model)
    path = save_adapter(model, config, base_sha, tmp_path / "adapter.safetensors", extra={"data_sha256": "abc"})
    saved = read_adapter(path)
    assert saved.config == config and saved.base_weights_sha256 == base_sha and saved.extra == {"data_sha256": "abc"}
    assert all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in saved.tensors)

    fresh = build(FAMILIES["siglip"])
    targets = load_adapter(fresh, path)
    assert sorted(targets) == list(saved.targets)
    batch = inputs(model)
    for a, b in zip(embeddings(model, batch), embeddings(fresh, batch), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="base weights"):
        load_adapter(build(FAMILIES["siglip"], seed=1), path)
    (tmp_path / "not.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="not a LoRA adapter file"):
        read_adapter(tmp_path / "not.safetensors")


def test_bad_options_are_refused_before_the_model_changes() -> None:
    model = build(FAMILIES["clip-vit"])
    with pytest.raises(ValueError, match=r"--lora-rank\) 65 is larger than .*visual\.transformer\.resblocks\.0"):
        apply_lora(model, LoRAConfig(rank=65))  # widths are 64
    with pytest.raises(ValueError, match=r"--lora-targets\) 'nothing\.\*' matches no projection"):
        apply_lora(model, LoRAConfig(targets=("q", "nothing.*")))
    with pytest.raises(ValueError, match=r"targets \(--lora-targets\) fc, proj match no projection in the image"):
        apply_lora(build(FAMILIES["clip-resnet"]), LoRAConfig(targets=("fc", "proj"), towers=("image",)))
    assert all(p.requires_grad for p in model.parameters()) and not adapted_modules(model)
    assert len(apply_lora(build(FAMILIES["clip-resnet"]), LoRAConfig(rank=2, towers=("image",)))) == 4  # no MLP
    with pytest.raises(ValueError, match=r"--lora-dropout"):
        LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match=r"--lora-rank"):
        LoRAConfig(rank=0)
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=2))
