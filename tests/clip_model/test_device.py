"""clip_model.device: the device setting's forms, the auto choice, the precision each device runs, every refusal;
and the inference copy the placement makes (``cpu`` exactly as before, the device boundary of on_device)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import clip_model
from clip_model.device import choose_precision, parse_device, resolve_device, resolve_placement
from clip_model.inference import on_device
from tests.support import save_tiny_model


def fake_cuda(monkeypatch: pytest.MonkeyPatch, devices: int) -> None:
    """Make torch report ``devices`` CUDA devices (0: CUDA unavailable) without touching a driver."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("device") / "tiny.safetensors", seed=0)


@pytest.mark.parametrize(
    ("setting", "form"),
    [
        ("auto", "auto"),
        ("cpu", "cpu"),
        ("CPU", "cpu"),
        (" cuda ", "cuda:0"),
        ("cuda:0", "cuda:0"),
        ("cuda:12", "cuda:12"),
    ],
)
def test_device_settings_have_one_normal_form(setting: str, form: str) -> None:
    assert parse_device(setting) == form


@pytest.mark.parametrize("setting", ["", "gpu", "mps", "cuda:", "cuda:-1", "cuda:x", "cuda0", "cpu:0", "auto,cpu"])
def test_any_other_device_setting_is_refused_naming_the_setting(setting: str) -> None:
    with pytest.raises(ValueError, match=r"--device / CLIPSEARCH_DEVICE\) is not one of auto, cpu, cuda, cuda:N"):
        parse_device(setting)


def test_auto_takes_the_first_cuda_device_where_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 0)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_placement() == clip_model.Placement(torch.device("cpu"), "fp32")  # the CPU as it always was
    fake_cuda(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")  # asked for: CUDA is not taken
    placement = resolve_placement()
    assert (placement, placement.dtype, str(placement)) == (
        clip_model.Placement(torch.device("cuda", 0), "fp16"),
        torch.float16,
        "cuda:0 (fp16)",
    )


def test_cuda_is_refused_where_there_is_none_saying_what_there_is(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 0)
    for setting in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(ValueError, match=r"device '.*' \(--device / CLIPSEARCH_DEVICE\) asks for CUDA, but this"):
            resolve_device(setting)
    fake_cuda(monkeypatch, 2)
    with pytest.raises(ValueError, match=r"'cuda:2' .* sees 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_without_cuda_the_error_says_whether_torch_lacks_it_or_finds_no_device(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 0)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match="built without CUDA"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ValueError, match=r"CUDA 12\.8\) finds no usable CUDA device"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    ("device", "precision", "chosen"),
    [
        ("cpu", None, "fp32"),
        ("cpu", "fp32", "fp32"),
        ("cpu", "int8", "int8"),
        ("cuda:0", None, "fp16"),
        ("cuda:0", "fp16", "fp16"),
        ("cuda:1", "fp32", "fp32"),  # float32 on CUDA, unpacked
    ],
)
def test_each_device_runs_its_precision(device: str, precision: str | None, chosen: str) -> None:
    assert choose_precision(torch.device(device), precision) == chosen


def test_cpu_only_and_cuda_only_precisions_are_refused_naming_both_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    both = r"--precision / CLIPSEARCH_PRECISION.*--device / CLIPSEARCH_DEVICE"
    with pytest.raises(ValueError, match=rf"'int8' \({both}\) chose cuda:0: set the device to cpu"):
        choose_precision(torch.device("cuda:0"), "int8", "auto")
    with pytest.raises(ValueError, match=r"'fp16' \(--precision / CLIPSEARCH_PRECISION\) runs on CUDA only"):
        choose_precision(torch.device("cpu"), "fp16", "cpu")
    with pytest.raises(ValueError, match=r"precision 'bf16' \(--precision / CLIPSEARCH_PRECISION\) is not one of"):
        choose_precision(torch.device("cpu"), "bf16")
    fake_cuda(monkeypatch, 1)  # auto finds CUDA, int8 was asked for: refused, not moved to the CPU
    with pytest.raises(ValueError, match=r"device 'auto' \(--device / CLIPSEARCH_DEVICE\) chose cuda:0"):
        resolve_placement("auto", "int8")
    assert resolve_placement("cpu", "int8") == clip_model.Placement(torch.device("cpu"), "int8")
    fake_cuda(monkeypatch, 0)
    assert resolve_placement("auto", "int8").precision == "int8"  # no CUDA: auto is the CPU, int8 runs there


def test_cpu_gives_exactly_the_vectors_it_gave_before(checkpoint: Path) -> None:
    """``device="cpu"`` (and ``auto`` without CUDA) is the packed fp32 or int8 copy as the library made it."""
    plain, preprocess = clip_model.load(checkpoint)
    pixels = torch.rand(3, 3, preprocess.image_size, preprocess.image_size, generator=torch.Generator().manual_seed(0))
    tokens = clip_model.tokenize(["a red square", "a photo of a cat"])
    for precision, before in (("fp32", clip_model.pack_for_cpu(plain)), ("int8", clip_model.quantize_int8(plain))):
        loaded = clip_model.load_for_inference(checkpoint, device="cpu", precision=precision)
        assert (loaded.device, loaded.precision) == ("cpu", precision)
        assert "encode_image" not in vars(loaded.model)  # no device boundary on the CPU
        with torch.inference_mode():
            assert torch.equal(loaded.model.encode_image(pixels, normalize=True), before.encode_image(pixels, True))
            assert torch.equal(loaded.model.encode_text(tokens, normalize=True), before.encode_text(tokens, True))


def test_a_refused_setting_reads_no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 0)
    with pytest.raises(ValueError, match="asks for CUDA"):
        clip_model.load_for_inference(tmp_path / "missing.safetensors", device="cuda")
    with pytest.raises(ValueError, match="runs on CUDA only"):
        clip_model.load_for_inference(tmp_path / "missing.safetensors", precision="fp16")


def test_on_device_casts_and_keeps_the_device_inside_the_encoders(checkpoint: Path) -> None:
    """The CUDA path's cast and boundary, run on the CPU in float16: CPU float32 unit rows out, close to fp32."""
    reference, preprocess = clip_model.load(checkpoint)
    model, _ = clip_model.load(checkpoint)
    half = on_device(model, torch.device("cpu"), torch.float16)
    assert half is model and not half.training and not any(p.requires_grad for p in half.parameters())
    layer_norms = [m for m in half.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert layer_norms and all(p.dtype == torch.float32 for m in layer_norms for p in m.parameters())
    assert half.dtype == torch.float16 and half.get_parameter("visual.conv1.weight").dtype == torch.float16
    pixels = torch.rand(4, 3, preprocess.image_size, preprocess.image_size, generator=torch.Generator().manual_seed(1))
    tokens = clip_model.tokenize(["a red square", "a photo of a cat", "x"])
    with torch.inference_mode():
        for encode, want, inputs in (
            (half.encode_image, reference.encode_image(pixels, normalize=True), pixels),
            (half.encode_text, reference.encode_text(tokens, normalize=True), tokens),
        ):
            got = encode(inputs, normalize=True)
            assert (got.dtype, got.device.type, got.shape) == (torch.float32, "cpu", want.shape)
            torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got)), atol=1e-6, rtol=0)
            assert torch.cosine_similarity(got, want).min().item() > 0.999
            assert encode(inputs).norm(dim=-1).sub(1).abs().max().item() > 1e-3  # unnormalized on request
        labels = ["a red square", "a photo of a cat"]
        want = clip_model.classify(reference, pixels, clip_model.build_zero_shot_classifier(reference, labels))
        got = clip_model.classify(half, pixels, clip_model.build_zero_shot_classifier(half, labels))
        logits, _ = half(pixels, tokens)
    assert half.logit_scale.dtype == torch.float32 and half.logit_scale.device.type == "cpu"
    assert (got.dtype, logits.dtype, logits.device.type) == (torch.float32, torch.float32, "cpu")
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)  # zero-shot through the boundary
    with pytest.raises(ValueError, match="already run on a device"):
        on_device(half, torch.device("cpu"), torch.float16)
