"""SigLIP / SigLIP 2 against transformers' ``SiglipModel`` on random weights, read from both checkpoint layouts.

Hugging Face layout: the folder ``save_pretrained`` writes. OpenCLIP layout: OpenCLIP cannot be installed here (it
needs torchvision), so its state dict is built from the HF model by the key map OpenCLIP's timm towers use
(:func:`open_clip_state_dict`, written from timm's ``VisionTransformer`` / ``AttentionPoolLatent`` and OpenCLIP's
``TextTransformer``), saved as an OpenCLIP hub folder and read back.

The sizes are those of the google/siglip-* and google/siglip2-* checkpoints' config.json (written out here: the hub
cannot be reached). Every shipped config is checked against the config.json of the checkpoint it stands for; the
parity tests at full size (every size, both layouts) are marked slow; the fast ones run small towers that keep what
sets SO400M apart (72-wide heads, an MLP width that is no multiple of the width, 14-pixel patches that do not divide
the input side).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from transformers.initialization import no_init_weights

import clip_model
from clip_model.checkpoint import build_model, read_checkpoint
from clip_model.config import (
    SigLIPConfig,
    TextConfig,
    VisionConfig,
    get_config,
    infer_siglip_config,
    list_configs,
    with_known_name,
)
from clip_model.download import download_tokenizer, sha256_file
from clip_model.errors import CheckpointMismatchError, DownloadError
from clip_model.pretrained import TokenizerFile, get_pretrained
from clip_model.siglip import SigLIP
from clip_model.siglip_convert import hf_siglip_config
from tests.clip_model.reference_models import scramble_
from tests.clip_model.sentencepiece_models import train_gemma_model, train_siglip_model

TOLERANCE = 1e-4  # max abs difference of unit embeddings and of logits, fp32
SIZES = {  # towers of google/siglip{,2}-base-patch16-*, -large-patch16-*, -so400m-patch14-*
    "base": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12},
    "large": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24},
    "so400m": {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16, "num_hidden_layers": 27},
}
SIZES["small"] = {"hidden_size": 144, "intermediate_size": 538, "num_attention_heads": 2, "num_hidden_layers": 2}
SIGLIP_VOCAB, SIGLIP2_VOCAB, SMALL_VOCAB = 32_000, 256_000, 1_000
GEMMA_TOKENIZER_CONFIG = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": False, "add_eos_token": True}


def hf_siglip(
    size: str, patch: int, image_size: int, vocab: int, layers: int | None = None
) -> transformers.SiglipModel:
    """A ``SiglipModel`` with random weights: matrices, embeddings and the probe normal with std ``fan_in ** -0.5``,
    norms and biases scrambled (every one non-trivial), SigLIP-like logit scale and bias; ``layers`` blocks a tower
    (None: the size's own depth).

    transformers' own initialisation is skipped: it is most of the time a small model takes to build, and it leaves
    biases at zero and the logit parameters at zero.
    """
    depth = {} if layers is None else {"num_hidden_layers": layers}
    text = {**SIZES[size], **depth, "vocab_size": vocab, "max_position_embeddings": 64}
    vision = {**SIZES[size], **depth, "patch_size": patch, "image_size": image_size}
    with no_init_weights():
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=gen) * param[0].numel() ** -0.5)
        scramble_(model.text_model, seed=0)
        scramble_(model.vision_model, seed=1)
        model.logit_scale.fill_(math.log(10.0) + 0.3)
        model.logit_bias.fill_(-4.0)
    return model.eval()


def siglip_tokens(batch: int, vocab: int, pad: int, eos: int, seed: int = 0) -> torch.Tensor:
    """Rows as a SigLIP tokenizer writes them: ids, the end token, padding to 64; one row fills it entirely."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.full((batch, 64), pad, dtype=torch.long)
    for i in range(batch):
        length = 63 if i == 0 else int(torch.randint(1, 40, (1,), generator=gen))
        rows[i, :length] = torch.randint(5, vocab, (length,), generator=gen)
        rows[i, length] = eos
    return rows


def measure(model: SigLIP, reference: transformers.SiglipModel, batch: int = 1) -> dict[str, float]:
    """Max abs differences of unit image / text embeddings and of logits; raw image features relative to their
    largest value."""
    side, vocab = model.image_size, model.config.text.vocab_size
    images = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(1))
    tokens = siglip_tokens(batch + 2, vocab, pad=1, eos=1)
    with torch.no_grad():
        ref = reference(input_ids=tokens, pixel_values=images)
        raw_reference = ref.vision_model_output.pooler_output
        raw = model.encode_image(images)
        logits, _ = model(images, tokens)
        return {
            "image": (torch.nn.functional.normalize(raw, dim=-1) - ref.image_embeds).abs().max().item(),
            "text": (model.encode_text(tokens, normalize=True) - ref.text_embeds).abs().max().item(),
            "logits": (logits - ref.logits_per_image).abs().max().item(),
            "raw_image_relative": ((raw - raw_reference).abs().max() / raw_reference.abs().max()).item(),
        }


def assert_matches(model: SigLIP, reference: transformers.SiglipModel) -> dict[str, float]:
    diffs = measure(model, reference)
    assert max(diffs["image"], diffs["text"], diffs["logits"]) <= TOLERANCE, diffs
    assert diffs["raw_image_relative"] <= TOLERANCE, diffs
    return diffs


def small_config(patch: int, side: int, tokenizer: str = "siglip") -> SigLIPConfig:
    """Our config for :func:`hf_siglip` ("small", ``patch``, ``side``, :data:`SMALL_VOCAB`)."""
    small = SIZES["small"]
    tower = {"width": small["hidden_size"], "heads": small["num_attention_heads"], "layers": small["num_hidden_layers"],
             "mlp_width": small["intermediate_size"]}  # fmt: skip
    return SigLIPConfig(
        embed_dim=small["hidden_size"],
        vision=VisionConfig(image_size=side, patch_size=patch, **tower),
        text=TextConfig(context_length=64, vocab_size=SMALL_VOCAB, **tower),
        tokenizer=tokenizer,  # type: ignore[arg-type]
    )


HF_CHECKPOINTS = {  # shipped config -> (size, patch, input side, vocabulary, context) of the checkpoint it stands for
    "ViT-B-16-SigLIP": ("base", 16, 224, SIGLIP_VOCAB, 64),  # google/siglip-base-patch16-224
    "ViT-B-16-SigLIP-256": ("base", 16, 256, SIGLIP_VOCAB, 64),
    "ViT-B-16-SigLIP-384": ("base", 16, 384, SIGLIP_VOCAB, 64),
    "ViT-B-16-SigLIP-512": ("base", 16, 512, SIGLIP_VOCAB, 64),
    "ViT-B-16-SigLIP-i18n-256": ("base", 16, 256, 250_000, 64),  # google/siglip-base-patch16-256-multilingual
    "ViT-L-16-SigLIP-256": ("large", 16, 256, SIGLIP_VOCAB, 64),
    "ViT-L-16-SigLIP-384": ("large", 16, 384, SIGLIP_VOCAB, 64),
    "ViT-SO400M-14-SigLIP": ("so400m", 14, 224, SIGLIP_VOCAB, 16),  # google/siglip-so400m-patch14-224
    "ViT-SO400M-14-SigLIP-378": ("so400m", 14, 378, SIGLIP_VOCAB, 64),  # timm's 384 model at the 378 it uses
    "ViT-SO400M-14-SigLIP-384": ("so400m", 14, 384, SIGLIP_VOCAB, 64),
    "ViT-B-16-SigLIP2": ("base", 16, 224, SIGLIP2_VOCAB, 64),  # google/siglip2-base-patch16-224
    "ViT-B-16-SigLIP2-256": ("base", 16, 256, SIGLIP2_VOCAB, 64),
    "ViT-B-16-SigLIP2-384": ("base", 16, 384, SIGLIP2_VOCAB, 64),
    "ViT-B-16-SigLIP2-512": ("base", 16, 512, SIGLIP2_VOCAB, 64),
    "ViT-B-32-SigLIP2-256": ("base", 32, 256, SIGLIP2_VOCAB, 64),
    "ViT-L-16-SigLIP2-256": ("large", 16, 256, SIGLIP2_VOCAB, 64),
    "ViT-L-16-SigLIP2-384": ("large", 16, 384, SIGLIP2_VOCAB, 64),
    "ViT-L-16-SigLIP2-512": ("large", 16, 512, SIGLIP2_VOCAB, 64),
    "ViT-SO400M-14-SigLIP2": ("so400m", 14, 224, SIGLIP2_VOCAB, 64),
    "ViT-SO400M-14-SigLIP2-378": ("so400m", 14, 378, SIGLIP2_VOCAB, 64),
    "ViT-SO400M-16-SigLIP2-256": ("so400m", 16, 256, SIGLIP2_VOCAB, 64),
    "ViT-SO400M-16-SigLIP2-384": ("so400m", 16, 384, SIGLIP2_VOCAB, 64),
    "ViT-SO400M-16-SigLIP2-512": ("so400m", 16, 512, SIGLIP2_VOCAB, 64),
}


def test_every_siglip_config_is_listed() -> None:
    shipped = {n for n in list_configs() if isinstance(get_config(n), SigLIPConfig)}
    assert shipped == set(HF_CHECKPOINTS)


@pytest.mark.parametrize("name", sorted(HF_CHECKPOINTS))
def test_hf_config_of_each_checkpoint_names_its_shipped_config(name: str, tmp_path: Path) -> None:
    size, patch, side, vocab, context = HF_CHECKPOINTS[name]
    text = {**SIZES[size], "vocab_size": vocab, "max_position_embeddings": context}
    vision = {**SIZES[size], "patch_size": patch, "image_size": side}
    transformers.SiglipConfig(text_config=text, vision_config=vision).save_pretrained(tmp_path)
    assert with_known_name(hf_siglip_config(tmp_path)) == get_config(name)


FAST_CASES = [  # (patch, input side)
    pytest.param(14, 46, id="patch14-3x3-4px-unused"),
    pytest.param(16, 64, id="patch16-4x4"),
]


@pytest.mark.parametrize(("patch", "side"), FAST_CASES)
def test_hf_folder_gives_transformers_outputs(patch: int, side: int, tmp_path: Path) -> None:
    reference = hf_siglip("small", patch, side, SMALL_VOCAB)
    reference.save_pretrained(tmp_path)
    model, preprocess = clip_model.load(tmp_path)
    assert isinstance(model, SigLIP) and model.config == small_config(patch, side)
    assert (preprocess.image_size, preprocess.resize_mode, preprocess.mean) == (side, "squash", (0.5, 0.5, 0.5))
    assert_matches(model, reference)


def open_clip_state_dict(reference: transformers.SiglipModel) -> dict[str, torch.Tensor]:
    """The HF model's tensors under OpenCLIP's SigLIP keys (``text.*`` CLIP-style, ``visual.trunk.*`` timm-style)."""
    sd = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    width = sd["vision_model.post_layernorm.weight"].shape[0]
    out = {"logit_scale": sd["logit_scale"].reshape(()), "logit_bias": sd["logit_bias"].reshape(())}
    out["text.token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
    out["text.positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
        out[f"text.ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
        out[f"text.text_projection.{kind}"] = sd[f"text_model.head.{kind}"]
        out[f"visual.trunk.patch_embed.proj.{kind}"] = sd[f"vision_model.embeddings.patch_embedding.{kind}"]
        out[f"visual.trunk.norm.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
        head = "vision_model.head"
        out[f"visual.trunk.attn_pool.q.{kind}"] = sd[f"{head}.attention.in_proj_{kind}"][:width]
        out[f"visual.trunk.attn_pool.kv.{kind}"] = sd[f"{head}.attention.in_proj_{kind}"][width:]
        out[f"visual.trunk.attn_pool.proj.{kind}"] = sd[f"{head}.attention.out_proj.{kind}"]
        out[f"visual.trunk.attn_pool.norm.{kind}"] = sd[f"{head}.layernorm.{kind}"]
        out[f"visual.trunk.attn_pool.mlp.fc1.{kind}"] = sd[f"{head}.mlp.fc1.{kind}"]
        out[f"visual.trunk.attn_pool.mlp.fc2.{kind}"] = sd[f"{head}.mlp.fc2.{kind}"]
    out["visual.trunk.pos_embed"] = sd["vision_model.embeddings.position_embedding.weight"][None]
    out["visual.trunk.attn_pool.latent"] = sd["vision_model.head.probe"]
    towers = (
        ("text_model", "text.transformer.resblocks", reference.config.text_config.num_hidden_layers,
         ("ln_1", "attn.in_proj_", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")),
        ("vision_model", "visual.trunk.blocks", reference.config.vision_config.num_hidden_layers,
         ("norm1", "attn.qkv.", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")),
    )  # fmt: skip
    for tower, blocks, layers, names in towers:
        for i in range(layers):
            src, dst = f"{tower}.encoder.layers.{i}", f"{blocks}.{i}"
            ln1, qkv, proj, ln2, fc1, fc2 = names
            for kind in ("weight", "bias"):
                out[f"{dst}.{ln1}.{kind}"] = sd[f"{src}.layer_norm1.{kind}"]
                out[f"{dst}.{qkv}{kind}"] = torch.cat([sd[f"{src}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
                out[f"{dst}.{proj}.{kind}"] = sd[f"{src}.self_attn.out_proj.{kind}"]
                out[f"{dst}.{ln2}.{kind}"] = sd[f"{src}.layer_norm2.{kind}"]
                out[f"{dst}.{fc1}.{kind}"] = sd[f"{src}.mlp.fc1.{kind}"]
                out[f"{dst}.{fc2}.{kind}"] = sd[f"{src}.mlp.fc2.{kind}"]
    return out


def write_open_clip_folder(reference: transformers.SiglipModel, folder: Path) -> Path:
    """An OpenCLIP hub folder: ``open_clip_model.safetensors`` + ``open_clip_config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(open_clip_state_dict(reference), str(folder / "open_clip_model.safetensors"))
    side = reference.config.vision_config.image_size
    config = {
        "model_cfg": {"embed_dim": reference.config.text_config.projection_size, "vision_cfg": {"image_size": side}},
        "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "resize_mode": "squash"},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(("patch", "side"), FAST_CASES)
def test_open_clip_layout_gives_transformers_outputs(patch: int, side: int, tmp_path: Path) -> None:
    reference = hf_siglip("small", patch, side, SMALL_VOCAB)
    model = build_model(read_checkpoint(write_open_clip_folder(reference, tmp_path)), small_config(patch, side))
    assert isinstance(model, SigLIP)
    assert_matches(model, reference)


def test_open_clip_folder_preprocessing_is_read_and_an_unsupported_resize_rule_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_open_clip_folder(hf_siglip("small", 16, 32, SMALL_VOCAB), tmp_path)
    assert read_checkpoint(folder).preprocess_cfg == {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"]["resize_mode"] = "longest"  # OpenCLIP's letterboxing, which clip_model does not do
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    assert read_checkpoint(folder).preprocess_cfg == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert "resize_mode 'longest' is not supported" in caplog.text


def test_open_clip_pytorch_bin_container_reads_like_safetensors(tmp_path: Path) -> None:
    reference = hf_siglip("small", 16, 32, SMALL_VOCAB)
    torch.save(open_clip_state_dict(reference), tmp_path / "open_clip_pytorch_model.bin")
    model = build_model(read_checkpoint(tmp_path / "open_clip_pytorch_model.bin"), small_config(16, 32))
    assert isinstance(model, SigLIP)
    assert_matches(model, reference)


def test_hf_model_safetensors_alone_loads_with_its_config(tmp_path: Path) -> None:
    """What a registry download is: the folder's weights file without its config.json."""
    reference = hf_siglip("small", 16, 32, SMALL_VOCAB)
    reference.save_pretrained(tmp_path / "hf")
    lone = (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "siglip.safetensors")
    model = build_model(read_checkpoint(lone), small_config(16, 32))
    assert isinstance(model, SigLIP)
    assert_matches(model, reference)


@pytest.mark.parametrize(
    ("name", "vocabulary"), [("ViT-B-16-SigLIP", "spiece.model"), ("ViT-B-16-SigLIP2", "tokenizer.model")]
)
def test_registry_lists_siglip_weights_with_their_vocabulary(name: str, vocabulary: str) -> None:
    weights = get_pretrained(name)
    assert isinstance(get_config(weights.config), SigLIPConfig)
    assert weights.tokenizer is not None and weights.tokenizer.url.endswith(f"/{vocabulary}")
    assert (weights.mean, weights.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_a_registry_vocabulary_is_downloaded_and_verified_like_weights(tmp_path: Path) -> None:
    source = train_siglip_model(tmp_path / "published")
    verified = TokenizerFile(source.as_uri(), sha256_file(source), "vocab.model")
    weights = dataclasses.replace(get_pretrained("ViT-B-16-SigLIP"), tokenizer=verified)
    assert download_tokenizer(weights, tmp_path / "cache", progress=False).read_bytes() == source.read_bytes()
    unverified = dataclasses.replace(weights, tokenizer=dataclasses.replace(verified, sha256=None))
    with pytest.raises(DownloadError, match="No verified sha256"):
        download_tokenizer(unverified, tmp_path / "other-cache", progress=False)


def test_tokenizer_saved_beside_the_weights_gives_transformers_ids_and_embeddings(tmp_path: Path) -> None:
    """load(folder) finds the vocabulary transformers saved; tokenizer_for(model) tokenizes as transformers does."""
    tokenizer = transformers.SiglipTokenizer(vocab_file=str(train_siglip_model(tmp_path / "train")))
    reference = hf_siglip("small", 16, 32, tokenizer.vocab_size)
    reference.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model, _ = clip_model.load(tmp_path / "model")
    texts = ["A photo of a CAT!", "über straße 2024", "the dog " * 40]
    tokens = clip_model.tokenizer_for(model)(texts, context_length=model.context_length, truncate=True)
    expected = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt").input_ids
    assert tokens.equal(expected)
    with torch.no_grad():
        expected_features = reference.get_text_features(input_ids=expected).pooler_output
        diff = model.encode_text(tokens) - expected_features
    assert (diff.abs().max() / expected_features.abs().max()).item() <= TOLERANCE


def test_siglip2_vocabulary_is_found_and_read_with_its_flavor(tmp_path: Path) -> None:
    gemma = train_gemma_model(tmp_path)
    reference = hf_siglip("small", 16, 32, SMALL_VOCAB)
    reference.save_pretrained(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(GEMMA_TOKENIZER_CONFIG))
    model, _ = clip_model.load(tmp_path)
    tokenizer = clip_model.tokenizer_for(model)
    assert isinstance(tokenizer, clip_model.SentencePieceTokenizer)
    assert (tokenizer.flavor, tokenizer.model_file, tokenizer.pad_token_id) == ("siglip2", gemma, 0)


@pytest.mark.parametrize("name", ["ViT-B-16-SigLIP", "ViT-SO400M-14-SigLIP2-378", "ViT-L-16-SigLIP2-512"])
def test_open_clip_state_dict_shapes_name_their_shipped_config(name: str) -> None:
    with torch.device("meta"):
        state_dict = SigLIP(get_config(name)).state_dict()  # type: ignore[arg-type]  # a SigLIP config
    assert infer_siglip_config(state_dict) == get_config(name)


def test_sides_that_give_the_same_patch_grid_need_the_folder_or_arch_to_tell_them_apart() -> None:
    with torch.device("meta"):
        state_dict = SigLIP(get_config("ViT-SO400M-14-SigLIP-384")).state_dict()  # type: ignore[arg-type]
    with pytest.raises(CheckpointMismatchError, match="ViT-SO400M-14-SigLIP-378, ViT-SO400M-14-SigLIP-384.*arch="):
        infer_siglip_config(state_dict)
    assert infer_siglip_config(state_dict, image_size=384).name == "ViT-SO400M-14-SigLIP-384"


@pytest.mark.parametrize("missing", ["visual.trunk.attn_pool.latent", "text.text_projection.bias", "logit_bias"])
def test_a_missing_weight_is_an_error_naming_it(missing: str, tmp_path: Path) -> None:
    reference = hf_siglip("small", 16, 32, SMALL_VOCAB)
    state_dict = open_clip_state_dict(reference)
    del state_dict[missing]
    save_file(state_dict, str(tmp_path / "weights.safetensors"))
    canonical = {"visual.trunk.attn_pool.latent": "visual.attn_pool.probe", "text.text_projection.bias":
                 "text_projection.bias", "logit_bias": "logit_bias"}[missing]  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match=f"{canonical}: missing"):
        build_model(read_checkpoint(tmp_path / "weights.safetensors"), small_config(16, 32))


def test_naflex_siglip2_folders_are_refused_with_a_reason(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "siglip2", "architectures": ["Siglip2Model"]}))
    save_file({"logit_bias": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="NaFlex"):
        clip_model.load(tmp_path)


TINY = SigLIPConfig(
    embed_dim=64,
    vision=VisionConfig(image_size=32, layers=2, width=64, heads=4, patch_size=8, mlp_width=96),
    text=TextConfig(width=48, heads=4, layers=2, context_length=16, vocab_size=100, mlp_width=80),
    tokenizer="siglip2",
)


def test_saved_checkpoint_carries_the_family_and_loads_back(tmp_path: Path) -> None:
    model, _ = clip_model.create_model(TINY, seed=0)
    model.eval()
    path = clip_model.save_checkpoint(model, tmp_path / "tiny.safetensors")
    loaded, preprocess = clip_model.load(path)
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (3, 16))
    assert isinstance(loaded, SigLIP) and loaded.config == TINY and preprocess.resize_mode == "squash"
    with torch.no_grad():
        torch.testing.assert_close(model(images, tokens)[0], loaded(images, tokens)[0], rtol=0, atol=1e-5)


def test_text_rows_must_have_the_full_context_length_and_are_never_trimmed() -> None:
    model, _ = clip_model.create_model(TINY, seed=0)
    with pytest.raises(ValueError, match="padded to the context length"):
        model.encode_text(torch.ones(1, 8, dtype=torch.long))
    rows = torch.zeros(2, 16, dtype=torch.long)
    rows[:, :3] = 5
    assert clip_model.trim_for(model, rows) is rows


def test_inference_copies_keep_the_encoders_contracts() -> None:
    model, _ = clip_model.create_model(TINY, seed=0)
    images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (3, 16))
    with torch.no_grad():
        expected = (model.eval().encode_image(images, normalize=True), model.encode_text(tokens, normalize=True))
        packed = clip_model.pack_for_cpu(model)
        int8 = clip_model.quantize_int8(model)
        for copy, tolerance in ((packed, 1e-5), (int8, 0.05)):
            assert (copy.encode_image(images, normalize=True) - expected[0]).abs().max().item() <= tolerance
            assert (copy.encode_text(tokens, normalize=True) - expected[1]).abs().max().item() <= tolerance


# (size, patch, side, vocab, shipped config of the same architecture, blocks a tower: None = the full depth). Every
# width, patch, side and vocabulary at full size; the full depth once per size: a block is a block, and two more
# 24-27-block models would add ~100 s of CI for nothing the shallow ones miss (the shipped configs' names, depths
# included, are checked for every checkpoint by test_hf_config_of_each_checkpoint_names_its_shipped_config).
FULL_CASES = [
    pytest.param("base", 16, 224, SIGLIP_VOCAB, "ViT-B-16-SigLIP", None, id="siglip-base-patch16-224"),
    pytest.param("base", 16, 224, SIGLIP2_VOCAB, "ViT-B-16-SigLIP2", None, id="siglip2-base-patch16-224"),
    pytest.param("large", 16, 256, SIGLIP_VOCAB, "ViT-L-16-SigLIP-256", 2, id="siglip-large-patch16-256-2-blocks"),
    pytest.param("large", 16, 256, SIGLIP2_VOCAB, "ViT-L-16-SigLIP2-256", None, id="siglip2-large-patch16-256"),
    pytest.param("so400m", 14, 384, SIGLIP_VOCAB, "ViT-SO400M-14-SigLIP-384", None, id="siglip-so400m-patch14-384"),
    pytest.param(
        "so400m", 16, 256, SIGLIP2_VOCAB, "ViT-SO400M-16-SigLIP2-256", 2, id="siglip2-so400m-patch16-256-2-blocks"
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("size", "patch", "side", "vocab", "name", "layers"), FULL_CASES)
def test_full_size_models_match_transformers_from_both_layouts(
    size: str, patch: int, side: int, vocab: int, name: str, layers: int | None, tmp_path: Path
) -> None:
    reference = hf_siglip(size, patch, side, vocab, layers)
    reference.save_pretrained(tmp_path / "hf")
    model, _ = clip_model.load(tmp_path / "hf")
    assert isinstance(model, SigLIP) and (layers is not None or model.config.name == name)
    assert model.config.vision.layers == reference.config.vision_config.num_hidden_layers
    assert_matches(model, reference)
    del model
    folder = write_open_clip_folder(reference, tmp_path / "open_clip")
    del reference  # keep one full-size copy in memory at a time
    if layers is None:
        model, _ = clip_model.load(folder)
        assert isinstance(model, SigLIP) and model.config.name == name
    else:  # no shipped config has this depth: the shipped one, cut to it
        config = get_config(name)
        shallow = dataclasses.replace(
            config,
            vision=dataclasses.replace(config.vision, layers=layers),
            text=dataclasses.replace(config.text, layers=layers),
        )
        model = build_model(read_checkpoint(folder), shallow)
    reference = transformers.SiglipModel.from_pretrained(tmp_path / "hf").eval()
    assert_matches(model, reference)


def test_zero_shot_probabilities_are_the_models_own_independent_sigmoids() -> None:
    model, _ = clip_model.create_model(TINY, seed=0)
    with torch.no_grad():
        model.logit_bias.fill_(-3.0)  # so that the sigmoids are far from summing to 1 by chance
        images, tokens = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (3, 16))
        logits_per_image = model.eval()(images, tokens)[0]  # [2, 3]: exp(scale) * cos + bias
        classifier = clip_model.ensemble_prompts(model.encode_text(tokens, normalize=True), 3)  # one prompt a class
        probabilities = clip_model.classify(model, images, classifier)
    assert clip_model.pair_logit_bias(model) is not None
    torch.testing.assert_close(probabilities, logits_per_image.sigmoid(), rtol=0, atol=1e-6)
    assert not torch.allclose(probabilities.sum(dim=-1), torch.ones(2), atol=0.05)


def test_softmax_trained_models_keep_probabilities_that_sum_to_one() -> None:
    clip = clip_model.CLIPConfig(64, TINY.vision, dataclasses.replace(TINY.text, vocab_size=49408))
    model, _ = clip_model.create_model(clip, seed=0)
    assert clip_model.pair_logit_bias(model) is None
    side = clip.vision.image_size
    with torch.no_grad():
        tokens = clip_model.tokenize(["a", "b", "c"], context_length=clip.text.context_length)
        classifier = clip_model.ensemble_prompts(model.encode_text(tokens, normalize=True), 3)
        probabilities = clip_model.classify(model.eval(), torch.randn(2, 3, side, side), classifier)
    torch.testing.assert_close(probabilities.sum(dim=-1), torch.ones(2), rtol=0, atol=1e-6)
