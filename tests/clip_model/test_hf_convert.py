"""HF CLIPModel folders -> canonical state dict: loads strictly into OpenAI's reference model, same features."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clip_model.errors import CheckpointError, CheckpointMismatchError, UnsafeCheckpointError
from clip_model.hf_convert import is_hf_clip_dir, read_hf_clip

transformers = pytest.importorskip("transformers")

from tests.reference import load_reference  # noqa: E402  # after the importorskip on purpose

SOT, EOT = 49406, 49407
VOCAB = 49408
EMBED_DIM = 48
IMAGE_SIZE, PATCH = 32, 16
VISION_WIDTH, VISION_LAYERS = 128, 2  # the reference ViT uses width // 64 heads
TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS = 64, 2, 2
CONTEXT = 16
BATCH = 3
TOLERANCE = 1e-4


def _hf_model(hidden_act: str = "quick_gelu", eos_token_id: int = EOT) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 4 * TEXT_WIDTH,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "max_position_embeddings": CONTEXT,
            "hidden_act": hidden_act,
            "eos_token_id": eos_token_id,
        },
        vision_config={
            "hidden_size": VISION_WIDTH,
            "intermediate_size": 4 * VISION_WIDTH,
            "num_hidden_layers": VISION_LAYERS,
            "num_attention_heads": VISION_WIDTH // 64,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH,
            "hidden_act": hidden_act,
        },
        projection_dim=EMBED_DIM,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # HF initialises LayerNorms to 1/0 and biases to 0: make every tensor count
        for tensor in model.parameters():
            tensor.add_(torch.randn_like(tensor) * 0.02)
    return model


def _reference(activation: str) -> nn.Module:
    ref = load_reference("model")
    model = ref.CLIP(
        EMBED_DIM, IMAGE_SIZE, VISION_LAYERS, VISION_WIDTH, PATCH, CONTEXT, VOCAB, TEXT_WIDTH, TEXT_HEADS, TEXT_LAYERS
    ).eval()
    if activation == "gelu":  # the reference hard-codes QuickGELU
        for module in model.modules():
            for name, child in module.named_children():
                if isinstance(child, ref.QuickGELU):
                    setattr(module, name, nn.GELU())
    return model


def _tokens() -> torch.Tensor:
    """CLIP-tokenizer-like rows: start, some ids, end, zero padding; different lengths."""
    generator = torch.Generator().manual_seed(1)
    rows = torch.zeros(BATCH, CONTEXT, dtype=torch.long)
    for row, length in enumerate((3, 9, CONTEXT - 2)):
        ids = torch.randint(1, SOT, (length,), generator=generator)
        rows[row, : length + 2] = torch.cat([torch.tensor([SOT]), ids, torch.tensor([EOT])])
    return rows


def _features(output: object) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features; 4.x returned the tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]  # either version


def _save_bin(model: nn.Module, folder: Path, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """transformers 5 always writes safetensors, so write the legacy pytorch_model.bin by hand."""
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save({**model.state_dict(), **(extra or {})}, folder / "pytorch_model.bin")
    return folder


def _assert_matches_hf(hf: nn.Module, folder: Path, activation: str) -> None:
    state_dict, config = read_hf_clip(folder)
    reference = _reference(activation)
    reference.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    tokens = _tokens()
    with torch.no_grad():
        ours_image, ours_text = reference.encode_image(images), reference.encode_text(tokens)
        hf_image = _features(hf.get_image_features(pixel_values=images))
        hf_text = _features(hf.get_text_features(input_ids=tokens))
    assert ours_image.shape == (BATCH, EMBED_DIM)
    assert (ours_image - hf_image).abs().max() < TOLERANCE
    assert (ours_text - hf_text).abs().max() < TOLERANCE
    assert config.activation == activation


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_safetensors_checkpoint_matches_hf(tmp_path: Path, hidden_act: str) -> None:
    hf = _hf_model(hidden_act)
    hf.save_pretrained(tmp_path)
    assert is_hf_clip_dir(tmp_path)
    _assert_matches_hf(hf, tmp_path, hidden_act)


def test_legacy_eos_token_id_pools_the_same(tmp_path: Path) -> None:
    """eos_token_id 2 makes HF pool at argmax of the ids, OpenAI's rule; 49407 makes it pool at the first EOT."""
    hf = _hf_model(eos_token_id=2)
    hf.save_pretrained(tmp_path)
    _assert_matches_hf(hf, tmp_path, "quick_gelu")


def test_pytorch_model_bin_with_position_ids(tmp_path: Path) -> None:
    hf = _hf_model()
    position_ids = {
        "text_model.embeddings.position_ids": torch.arange(CONTEXT)[None],
        "vision_model.embeddings.position_ids": torch.arange((IMAGE_SIZE // PATCH) ** 2 + 1)[None],
    }
    folder = _save_bin(hf, tmp_path, position_ids)
    assert is_hf_clip_dir(folder)
    _assert_matches_hf(hf, folder, "quick_gelu")


def test_sharded_checkpoint(tmp_path: Path) -> None:
    hf = _hf_model()
    hf.save_pretrained(tmp_path, max_shard_size="1MB")
    if not (tmp_path / "model.safetensors.index.json").is_file():
        pytest.skip("this transformers version did not shard")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert is_hf_clip_dir(tmp_path)
    _assert_matches_hf(hf, tmp_path, "quick_gelu")


def test_config_is_read(tmp_path: Path) -> None:
    _hf_model().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}), encoding="utf-8"
    )
    _, config = read_hf_clip(tmp_path)
    assert config.embed_dim == EMBED_DIM
    assert (config.vision.image_size, config.vision.patch_size) == (IMAGE_SIZE, PATCH)
    assert (config.vision.width, config.vision.layers, config.vision.heads) == (VISION_WIDTH, VISION_LAYERS, 2)
    assert config.vision.mlp_width == 4 * VISION_WIDTH
    assert (config.text.width, config.text.layers, config.text.heads) == (TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS)
    assert (config.text.context_length, config.text.vocab_size) == (CONTEXT, VOCAB)
    assert config.preprocess.mean == (0.5, 0.5, 0.5) and config.preprocess.std == (0.25, 0.25, 0.25)


def test_fp16_checkpoint_keeps_dtype(tmp_path: Path) -> None:
    hf = _hf_model()
    expected = {k: v.half() for k, v in hf.state_dict().items()}
    hf.half().save_pretrained(tmp_path)
    state_dict, _ = read_hf_clip(tmp_path)
    assert {t.dtype for t in state_dict.values()} == {torch.float16}
    assert torch.equal(state_dict["visual.proj"], expected["visual_projection.weight"].t())
    q, k, v = (expected[f"text_model.encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(state_dict["transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))
    _reference("quick_gelu").load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    _hf_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["vision_model.encoder.layers.0.self_attn.rotary.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"vision_model\.encoder\.layers\.0\.self_attn\.rotary\.weight"):
        read_hf_clip(tmp_path)


def test_missing_and_surplus_keys(tmp_path: Path) -> None:
    _hf_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["text_model.encoder.layers.0.self_attn.k_proj.bias"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"k_proj\.bias missing"):
        read_hf_clip(tmp_path)
    weights = load_file(tmp_path / "model.safetensors") | {
        "text_model.encoder.layers.0.self_attn.k_proj.bias": torch.zeros(TEXT_WIDTH),
        "text_model.encoder.layers.5.mlp.fc1.bias": torch.zeros(4 * TEXT_WIDTH),
    }
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"transformer\.resblocks\.5\.mlp\.c_fc\.bias"):
        read_hf_clip(tmp_path)


@pytest.mark.parametrize("hidden_act", ["gelu_new", "relu"])
def test_unsupported_activation(tmp_path: Path, hidden_act: str) -> None:
    _hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    config["text_config"]["hidden_act"] = hidden_act
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointMismatchError, match=hidden_act):
        read_hf_clip(tmp_path)


class _CallsSystem:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)


def test_malicious_bin_is_refused(tmp_path: Path) -> None:
    folder = _save_bin(_hf_model(), tmp_path / "model")
    marker = tmp_path / "pwned"
    torch.save({"logit_scale": _CallsSystem(f"touch {shlex.quote(str(marker))}")}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_hf_clip(folder)
    assert not marker.exists()


def test_is_hf_clip_dir_negatives(tmp_path: Path) -> None:
    assert not is_hf_clip_dir(tmp_path / "missing")
    assert not is_hf_clip_dir(tmp_path)  # empty folder
    _hf_model().save_pretrained(tmp_path / "model")
    assert is_hf_clip_dir(tmp_path / "model")
    assert not is_hf_clip_dir(tmp_path / "model" / "config.json")  # a file, not a folder
    (tmp_path / "model" / "model.safetensors").rename(tmp_path / "model" / "other.safetensors")
    assert not is_hf_clip_dir(tmp_path / "model")  # no weights
    (tmp_path / "model" / "other.safetensors").rename(tmp_path / "model" / "model.safetensors")
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "siglip"}), encoding="utf-8")
    assert not is_hf_clip_dir(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text("{not json", encoding="utf-8")
    assert not is_hf_clip_dir(tmp_path / "model")
    with pytest.raises(CheckpointError, match="not a Hugging Face CLIPModel"):
        read_hf_clip(tmp_path / "model")


def test_corrupt_safetensors(tmp_path: Path) -> None:
    _hf_model().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_hf_clip(tmp_path)
