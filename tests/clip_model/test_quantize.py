"""int8 CPU mode: which layers are quantized, the encoders' contracts, accuracy against float32, ``load(precision=)``.

Accuracy is measured as the cosine to the float32 features after subtracting the float32 batch mean: random
CLIPs map every input to nearly one direction, so the raw cosine is ~0.9999 whatever the quantizer does.
Thresholds sit below what was measured (in brackets) on these seeds.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clip_model
from clip_model import quantize
from clip_model.config import CLIPConfig
from clip_model.quantize import Int8Linear, Int8MLP, Int8SelfAttention, quantize_int8
from clip_model.transformer import SelfAttention
from tests.clip_model.reference_models import random_images, random_tokens, scramble_
from tests.clip_model.test_model import tiny_config

MIN_CENTRED_COSINE = 0.99  # measured min: tiny ViT image 0.9988, text 0.9971; tiny ResNet image 0.9992, text 0.9986
MIN_CENTRED_COSINE_VIT_B32 = 0.99  # measured min: image 0.9950, text 0.9977
MIN_TOP10_OVERLAP = 0.9  # mean fraction of the float32 top 10 that int8 also returns (measured 0.98)
TOKEN_RTOL = 0.05  # ||int8 - fp32|| / ||fp32 - bias|| of one token: median 0.013, max 0.030 over 200 seeds
CHANNEL_RTOL = 0.02  # the same for one output channel over 256 tokens: max 0.0093 over 200 seeds
# (per-tensor scales fail both by far: the outlier token, or the small channels, leave the others ~1 step)


def centred_cosine(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[B] cosine of each row to ``reference`` after subtracting ``reference``'s batch mean from both."""
    mean = reference.mean(dim=0)
    return F.cosine_similarity(features - mean, reference - mean, dim=-1)


def calibrate_batchnorm_(model: clip_model.CLIP, seed: int) -> None:
    """Set BN statistics from one batch: a random ResNet otherwise maps every image to one feature (spread 4e-4)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = 1.0
    model.train()
    with torch.no_grad():
        model.encode_image(random_images(model.config, batch=16, seed=seed))
    model.eval()


def random_model(config: CLIPConfig | str, seed: int = 0) -> clip_model.CLIP:
    model, _ = clip_model.create_model(config, seed=seed)
    scramble_(model, seed)
    if model.config.vision.is_resnet:
        calibrate_batchnorm_(model, seed + 100)
    return model.eval()


@pytest.fixture(scope="module", params=["vit", "resnet"])
def pair(request: pytest.FixtureRequest) -> tuple[clip_model.CLIP, clip_model.CLIP]:
    """(float32 model, its int8 copy) for a tiny ViT and a tiny ResNet CLIP."""
    model = random_model(tiny_config(resnet=request.param == "resnet"))
    return model, quantize_int8(model)


def linear_layers_and_blocks(model: clip_model.CLIP) -> tuple[int, int]:
    """(linear layers an inference copy swaps, transformer blocks) of ``model``: 4 a block (in_proj, out_proj, c_fc,
    c_proj), plus q, k, v, c of a ResNet's attention pool."""
    blocks = len(model.transformer.resblocks)
    if model.config.vision.is_resnet:
        return 4 * blocks + 4, blocks
    blocks += len(model.visual.transformer.resblocks)
    return 4 * blocks, blocks


def test_every_linear_layer_becomes_int8(pair: tuple[clip_model.CLIP, clip_model.CLIP]) -> None:
    model, quantized = pair
    assert not any(isinstance(m, nn.Linear | SelfAttention) for m in quantized.modules())
    expected, blocks = linear_layers_and_blocks(model)
    assert sum(isinstance(m, Int8Linear) for m in quantized.modules()) == expected
    assert sum(isinstance(m, Int8SelfAttention) for m in quantized.modules()) == blocks
    assert sum(isinstance(m, Int8MLP) for m in quantized.modules()) == blocks
    assert all(m.qweight.dtype == torch.int8 for m in quantized.modules() if isinstance(m, Int8Linear))
    assert clip_model.is_quantized(quantized) and not clip_model.is_quantized(model)
    assert not any(p.requires_grad for p in quantized.parameters()) and not quantized.training


def test_the_callers_model_is_left_unchanged() -> None:
    model = random_model(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_int8(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert sum(isinstance(m, SelfAttention) for m in model.modules()) == 4
    assert all(p.requires_grad for p in model.parameters())


def test_encoders_keep_their_contracts(pair: tuple[clip_model.CLIP, clip_model.CLIP]) -> None:
    model, quantized = pair
    images, tokens = random_images(model.config, batch=3), random_tokens(batch=2)
    with torch.inference_mode():
        outputs = [
            quantized.encode_image(images),
            quantized.encode_image(images, normalize=True),
            quantized.encode_text(tokens),
            quantized.encode_text(tokens, normalize=True),
            quantized.encode_text(tokens[:, :20]),  # shorter than the context, as the tokenizer may give
        ]
        logits_per_image, logits_per_text = quantized(images, tokens)
    embed_dim = model.config.embed_dim
    assert [tuple(o.shape) for o in outputs] == [(3, embed_dim)] * 2 + [(2, embed_dim)] * 3
    assert all(o.dtype == torch.float32 for o in outputs)
    assert torch.allclose(outputs[1].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(outputs[3].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert logits_per_image.shape == (3, 2) and torch.equal(logits_per_text, logits_per_image.t())


def worst_centred_cosines(
    model: clip_model.CLIP, quantized: clip_model.CLIP, batch: int, seed: int
) -> tuple[float, float]:
    """(image, text): the smallest centred cosine between int8 and float32 features over a random batch."""
    images, tokens = random_images(model.config, batch=batch, seed=seed), random_tokens(batch=batch, seed=seed)
    with torch.inference_mode():
        image_cos = centred_cosine(quantized.encode_image(images), model.encode_image(images))
        text_cos = centred_cosine(quantized.encode_text(tokens), model.encode_text(tokens))
    return image_cos.min().item(), text_cos.min().item()


def test_features_stay_close_to_float32(pair: tuple[clip_model.CLIP, clip_model.CLIP]) -> None:
    image_cos, text_cos = worst_centred_cosines(*pair, batch=16, seed=1)
    assert image_cos >= MIN_CENTRED_COSINE and text_cos >= MIN_CENTRED_COSINE


def test_text_to_image_top10_matches_float32() -> None:
    model = random_model(tiny_config())
    quantized = quantize_int8(model)
    images, tokens = random_images(model.config, batch=200, seed=2), random_tokens(batch=10, seed=2)
    overlaps = []
    with torch.inference_mode():
        for m in (model, quantized):
            scores = m.encode_text(tokens, normalize=True) @ m.encode_image(images, normalize=True).t()  # [10, 200]
            overlaps.append(scores.topk(10, dim=-1).indices)
    shared = [len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(*overlaps, strict=True)]
    assert sum(shared) / len(shared) >= MIN_TOP10_OVERLAP


def test_vit_b32_sized_model_stays_close_to_float32() -> None:
    model = random_model("ViT-B-32")
    image_cos, text_cos = worst_centred_cosines(model, quantize_int8(model), batch=8, seed=3)
    assert image_cos >= MIN_CENTRED_COSINE_VIT_B32 and text_cos >= MIN_CENTRED_COSINE_VIT_B32


def test_int8_linear_scales_each_token_and_channel_separately() -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.mul_(torch.logspace(-2, 1, 48)[:, None])  # output channels three decades apart
    bias = linear.bias.detach()
    quantized = Int8Linear.from_linear(linear)
    x = torch.randn(2, 5, 64, generator=gen)
    x[0, 0] *= 1000.0  # one outlier token must not cost the other tokens their precision
    x[1, 2] = 0.0
    many = torch.randn(256, 64, generator=gen)
    with torch.inference_mode():
        want, got = linear(x), quantized(x)
        channel_error = (quantized(many) - linear(many)).norm(dim=0) / (linear(many) - bias).norm(dim=0)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert torch.equal(got[1, 2], bias)  # an all-zero token gives exactly the bias
    per_token_error = (got - want).norm(dim=-1) / (want - bias).norm(dim=-1).clamp_min(1e-12)
    assert per_token_error.max().item() <= TOKEN_RTOL
    assert channel_error.max().item() <= CHANNEL_RTOL  # the small channels keep their own scale


def test_chunked_rows_change_no_bit_of_the_output(monkeypatch: pytest.MonkeyPatch) -> None:
    model = random_model(tiny_config())
    quantized = quantize_int8(model)
    images, tokens = random_images(model.config, batch=5), random_tokens(batch=4)
    with torch.inference_mode():
        monkeypatch.setattr(quantize, "CHUNK_ROWS_PER_THREAD", 1 << 30)  # one chunk
        whole = quantized.encode_image(images), quantized.encode_text(tokens)
        monkeypatch.setattr(quantize, "CHUNK_ROWS_PER_THREAD", 7)  # 17 tokens an image: chunks cross images
        chunked = quantized.encode_image(images), quantized.encode_text(tokens)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_runs_under_inference_mode_in_a_worker_thread() -> None:
    model = random_model(tiny_config())
    images, tokens = random_images(model.config, batch=2), random_tokens(batch=2)

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            quantized = quantize_int8(model)  # quantizing inside inference mode works too
            return quantized.encode_image(images), quantized.encode_text(tokens)

    with ThreadPoolExecutor(1) as pool:
        image_thread, text_thread = pool.submit(encode).result()
    quantized = quantize_int8(model)
    with torch.no_grad():
        assert torch.equal(quantized.encode_image(images), image_thread)
        assert torch.equal(quantized.encode_text(tokens), text_thread)


def test_quantize_refuses_models_it_cannot_run() -> None:
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="CPU only; the model is on meta"):
        quantize_int8(model.to("meta"))
    with pytest.raises(ValueError, match="float32 model, not torch.float16"):
        quantize_int8(random_model(tiny_config()).half())


def test_load_int8_from_a_saved_checkpoint(tmp_path: Path) -> None:
    model = random_model(tiny_config())
    path = clip_model.save_checkpoint(model, tmp_path / "tiny.safetensors")
    loaded, preprocess = clip_model.load(path, precision="int8")
    assert clip_model.is_quantized(loaded) and preprocess.image_size == model.image_size
    images, tokens = random_images(model.config, batch=4), random_tokens(batch=4)
    with torch.inference_mode():
        assert torch.equal(loaded.encode_image(images), quantize_int8(model).encode_image(images))
        assert centred_cosine(loaded.encode_text(tokens), model.encode_text(tokens)).min() >= MIN_CENTRED_COSINE
    fp32, _ = clip_model.load(path)
    assert not clip_model.is_quantized(fp32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "fp16"}, "precision must be one of 'fp32', 'int8'; got 'fp16'"),
        ({"precision": "INT8"}, "precision must be one of 'fp32', 'int8'; got 'INT8'"),
        ({"precision": "int8", "device": "cuda"}, "precision='int8' runs on the CPU only, not on cuda"),
        ({"precision": "int8", "dtype": torch.float16}, "quantizes a float32 model; leave dtype unset"),
    ],
)
def test_load_rejects_bad_precision_before_reading(kwargs: dict[str, object], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        clip_model.load(tmp_path / "never-read.safetensors", **kwargs)  # type: ignore[arg-type]  # bad on purpose
