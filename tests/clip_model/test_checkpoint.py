"""Reading checkpoints in their many wrappings, and refusing what is not a CLIP checkpoint."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import clip_model
from clip_model.config import get_config
from clip_model.download import sha256_file
from clip_model.pretrained import get_pretrained
from tests.clip_model.reference_models import random_images, random_tokens, reference_clip

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def vit_b32_gelu() -> torch.nn.Module:
    """OpenAI's reference ViT-B/32 with its MLP activation switched to exact GELU: OpenCLIP's laion models."""
    return reference_clip(get_config("ViT-B-32"), gelu=True)


def assert_parity(model: clip_model.CLIP, ref: torch.nn.Module) -> None:
    cfg = model.config
    images, tokens = random_images(cfg), random_tokens()
    with torch.no_grad():
        assert (model.encode_image(images) - ref.encode_image(images)).abs().max().item() <= TOLERANCE
        assert (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max().item() <= TOLERANCE


def test_openclip_gelu_safetensors_with_arch(vit_b32_gelu: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in vit_b32_gelu.state_dict().items()}, str(path))
    model, _ = clip_model.load(path, arch="ViT-B-32")
    assert model.config.activation == "gelu"
    assert_parity(model, vit_b32_gelu)


def test_openclip_hub_folder_says_gelu_and_normalization(vit_b32_gelu: torch.nn.Module, tmp_path: Path) -> None:
    torch.save(dict(vit_b32_gelu.state_dict()), tmp_path / "open_clip_pytorch_model.bin")
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"embed_dim": 512}, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    )
    model, preprocess = clip_model.load(tmp_path)  # no arch=: the folder's config says GELU
    assert model.config.activation == "gelu" and model.config.name == "ViT-B-32"
    assert preprocess.mean == (0.5, 0.5, 0.5)
    assert_parity(model, vit_b32_gelu)


@pytest.fixture(scope="module")
def rn50_state_dict() -> dict[str, torch.Tensor]:
    return clip_model.create_model("RN50", seed=0)[0].state_dict()


@pytest.mark.parametrize("wrap", ["state_dict", "model", "module-prefix", "compiled-prefix"])
def test_training_checkpoint_wrappers_are_unwrapped(
    wrap: str, rn50_state_dict: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    sd = rn50_state_dict
    obj: dict[str, object] = {
        "state_dict": {"epoch": 3, "state_dict": sd},
        "model": {"model": sd, "step": 10},
        "module-prefix": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "compiled-prefix": {f"_orig_mod.{k}": v for k, v in sd.items()},
    }[wrap]
    torch.save(obj, tmp_path / "ckpt.pt")
    loaded, _ = clip_model.load(tmp_path / "ckpt.pt")
    assert loaded.config.name == "RN50"
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())


def test_not_a_clip_checkpoint_names_its_keys(tmp_path: Path) -> None:
    torch.save({"encoder.layer.0.weight": torch.zeros(2), "classifier.bias": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(clip_model.CheckpointMismatchError, match="encoder.layer.0.weight"):
        clip_model.load(tmp_path / "x.pt")


def test_missing_and_misshapen_keys_are_named(vit_b32_gelu: torch.nn.Module, tmp_path: Path) -> None:
    sd = dict(vit_b32_gelu.state_dict())
    del sd["ln_final.bias"]
    torch.save(sd, tmp_path / "missing.pt")
    with pytest.raises(clip_model.CheckpointMismatchError, match="ln_final.bias: missing"):
        clip_model.load(tmp_path / "missing.pt", arch="ViT-B-32-quickgelu")
    sd = dict(vit_b32_gelu.state_dict())
    sd["visual.proj"] = torch.zeros(768, 256)
    torch.save(sd, tmp_path / "shape.pt")
    with pytest.raises(clip_model.CheckpointMismatchError, match=r"visual.proj: expected shape \(768, 512\)"):
        clip_model.load(tmp_path / "shape.pt", arch="ViT-B-32-quickgelu")


class Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, ("__import__('pathlib').Path('PWNED').touch()",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the payload is written as protocol 4
def test_pickle_payload_in_plain_checkpoint_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"text_projection": torch.zeros(2, 2), "x": Exploit()}, tmp_path / "evil.pt", pickle_protocol=2)
    with pytest.raises(clip_model.CheckpointError, match="weights-only"):
        clip_model.load(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()
    with open(tmp_path / "evil.bin", "wb") as f:  # legacy (non-zip) pickle format too
        pickle.dump({"x": Exploit()}, f)
    with pytest.raises(clip_model.CheckpointError):
        clip_model.load(tmp_path / "evil.bin")
    assert not (tmp_path / "PWNED").exists()


def test_truncated_files_fail_with_the_path(rn50_state_dict: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model = clip_model.CLIP(clip_model.get_config("RN50"))
    model.load_state_dict(rn50_state_dict)
    path = clip_model.save_checkpoint(model, tmp_path / "m.safetensors")
    torch.save(rn50_state_dict, tmp_path / "m.pt")
    for p in (path, tmp_path / "m.pt"):
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        with pytest.raises(clip_model.CheckpointError, match=str(p.name)):
            clip_model.load(p)


def test_missing_path_and_plain_directory(tmp_path: Path) -> None:
    with pytest.raises(clip_model.UnknownModelError):
        clip_model.load(tmp_path / "nope.pt")
    with pytest.raises(clip_model.CheckpointError, match="neither a Hugging Face CLIPModel"):
        clip_model.load(tmp_path)


def test_registry_name_downloads_verifies_caches_and_matches_reference(
    vit_b32_gelu: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    published = tmp_path / "published" / "weights.bin"
    published.parent.mkdir()
    torch.save({k: v.half() for k, v in vit_b32_gelu.state_dict().items()}, published)  # as OpenCLIP ships fp16
    entry = dataclasses.replace(
        get_pretrained("ViT-B-32/laion2b_s34b_b79k"),
        url=published.as_uri(),
        sha256=sha256_file(published),
        filename="ViT-B-32-test.bin",
        format="state_dict",
    )
    monkeypatch.setattr(clip_model.factory, "resolve_pretrained", lambda name: entry)
    cache = tmp_path / "cache"
    model, _ = clip_model.load("ViT-B-32/laion2b_s34b_b79k", cache_dir=cache, progress=False)
    assert (cache / entry.filename).is_file() and model.config.name == "ViT-B-32"
    published.unlink()  # the second load must come from the cache
    again, _ = clip_model.load("ViT-B-32/laion2b_s34b_b79k", cache_dir=cache, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    ref = reference_clip(get_config("ViT-B-32"), gelu=True).half().float()  # same weights, rounded like the file
    assert_parity(model, ref)
