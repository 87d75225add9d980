"""Reading TorchScript archives: exact state dicts for traced/scripted CLIPs, refusal of foreign pickle globals."""

from __future__ import annotations

import os
import pickle
import re
import shlex
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from clip_model.errors import CheckpointError, UnsafeCheckpointError
from clip_model.torchscript import is_torchscript_archive, read_torchscript_state_dict
from tests.reference import load_reference

# ref.CLIP(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size, context_length, vocab_size,
#          transformer_width, transformer_heads, transformer_layers)
VIT_ARGS = (32, 32, 2, 64, 16, 8, 100, 32, 2, 2)
RESNET_ARGS = (32, 64, (1, 1, 1, 1), 16, None, 8, 100, 32, 2, 2)
BATCH = 2
SEED = 0

# Building the archives needs torch.jit, which warns about tracing the reference code and about its own deprecation.
pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
]


def _reference_clip(args: tuple[object, ...]) -> nn.Module:
    torch.manual_seed(SEED)
    return load_reference("model").CLIP(*args).eval()


def _inputs(model: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    side = model.visual.input_resolution
    images = torch.randn(BATCH, 3, side, side).to(dtype)
    tokens = torch.randint(0, model.vocab_size, (BATCH, model.context_length))
    return images, tokens


def _trace(
    model: nn.Module,
    path: Path,
    dtype: torch.dtype = torch.float32,
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    traced = torch.jit.trace(model, inputs or _inputs(model, dtype), check_trace=False)
    torch.jit.save(traced, str(path))
    return path


def _with_plain_layernorms(module: nn.Module) -> nn.Module:
    """The reference LayerNorm calls ``super().forward``, which TorchScript cannot script: swap in nn.LayerNorm."""
    for name, child in module.named_children():
        if isinstance(child, nn.LayerNorm) and type(child) is not nn.LayerNorm:
            plain = nn.LayerNorm(child.normalized_shape, eps=child.eps)
            plain.load_state_dict(child.state_dict())
            setattr(module, name, plain)
        else:
            _with_plain_layernorms(child)
    return module


def _assert_same_state(read: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(read) == set(expected)
    for key, tensor in expected.items():
        assert read[key].dtype == tensor.dtype, key
        assert read[key].shape == tensor.shape, key
        assert torch.equal(read[key], tensor), key


def _fp16_like_openai(model: nn.Module) -> nn.Module:
    load_reference("model").convert_weights(model)  # conv/linear/attention/projections fp16, the rest fp32
    return model


@pytest.mark.parametrize("args", [VIT_ARGS, RESNET_ARGS], ids=["vit", "resnet"])
def test_traced_archive_matches_state_dict(tmp_path: Path, args: tuple[object, ...]) -> None:
    model = _reference_clip(args)
    path = _trace(model, tmp_path / "model.pt")
    assert is_torchscript_archive(path)
    _assert_same_state(read_torchscript_state_dict(path), model.state_dict())


@pytest.mark.parametrize("args", [VIT_ARGS, RESNET_ARGS], ids=["vit", "resnet"])
def test_traced_fp16_archive_keeps_stored_dtypes(tmp_path: Path, args: tuple[object, ...]) -> None:
    model = _fp16_like_openai(_reference_clip(args))
    path = _trace(model, tmp_path / "model.pt", dtype=torch.float16)
    read = read_torchscript_state_dict(path)
    _assert_same_state(read, model.state_dict())
    assert read["visual.conv1.weight"].dtype == torch.float16


def test_all_half_archive(tmp_path: Path) -> None:
    model = _reference_clip(VIT_ARGS)
    traced = torch.jit.trace(model, _inputs(model, torch.float32))
    traced.half()
    torch.jit.save(traced, str(tmp_path / "half.pt"))
    read = read_torchscript_state_dict(tmp_path / "half.pt")
    _assert_same_state(read, model.half().state_dict())
    assert {t.dtype for t in read.values()} == {torch.float16}


@pytest.mark.parametrize("tower", ["visual", "transformer"])
def test_scripted_archive_matches_state_dict(tmp_path: Path, tower: str) -> None:
    """The whole reference CLIP does not script; its ViT tower and text transformer do (after the LayerNorm swap).

    The text transformer also holds ``attn_mask`` as a plain tensor attribute: it is pickled but is no parameter or
    buffer, so it must not show up.
    """
    module = _with_plain_layernorms(getattr(_reference_clip(VIT_ARGS), tower))
    torch.jit.save(torch.jit.script(module), str(tmp_path / "scripted.pt"))
    read = read_torchscript_state_dict(tmp_path / "scripted.pt")
    _assert_same_state(read, module.state_dict())
    assert not any(key.endswith("attn_mask") for key in read)


def test_openai_extra_scalars_are_dropped(tmp_path: Path) -> None:
    """OpenAI's traced models carry these as tensors (the reference keeps them as plain ints: swap them)."""
    model = _reference_clip(VIT_ARGS)
    inputs = _inputs(model, torch.float32)
    expected = model.state_dict()
    for name in ("input_resolution", "context_length", "vocab_size"):
        if hasattr(model, name):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(7))
    read = read_torchscript_state_dict(_trace(model, tmp_path / "model.pt", inputs=inputs))
    _assert_same_state(read, expected)


class _Views(nn.Module):
    """Buffers that are strided views into other tensors' storage."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.arange(24.0).reshape(4, 6))
        self.register_buffer("weight_t", self.weight.detach().t())
        base = torch.arange(10.0, dtype=torch.float64)
        self.register_buffer("every_other", base[3:9:2])
        self.register_buffer("head", base[:3])
        self.register_buffer("column", torch.arange(12, dtype=torch.int32).reshape(3, 4)[:, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.weight_t.sum() + self.every_other.sum() + self.head.sum() + self.column.sum()
        return x @ self.weight.t() + extra


@pytest.mark.parametrize("compile_", [torch.jit.script, lambda m: torch.jit.trace(m, torch.ones(2, 6))])
def test_views_and_offsets_are_rebuilt(tmp_path: Path, compile_: Callable[[nn.Module], torch.jit.ScriptModule]) -> None:
    module = _Views()
    torch.jit.save(compile_(module), str(tmp_path / "views.pt"))
    read = read_torchscript_state_dict(tmp_path / "views.pt")
    _assert_same_state(read, module.state_dict())
    assert read["weight_t"].stride() == (1, 6)
    assert read["weight_t"].untyped_storage().data_ptr() == read["weight"].untyped_storage().data_ptr()
    assert read["every_other"].stride() == (2,) and read["every_other"].storage_offset() == 3
    assert read["column"].tolist() == [1, 5, 9]


# --- hostile and broken files ---------------------------------------------------------------------------------------


def _small_archive(tmp_path: Path) -> Path:
    return _trace(_reference_clip(VIT_ARGS), tmp_path / "real.pt")


def _replace_data_pickle(source: Path, target: Path, new_pickle: Callable[[bytes], bytes]) -> Path:
    """Copy a TorchScript zip, swapping ``<prefix>/data.pkl`` for ``new_pickle(old)``."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, new_pickle(data) if info.filename.endswith("/data.pkl") else data)
    return target


def _binunicode(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


class _CallsSystem:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (self.command,)  # pickled as posix.system on Linux


class _CallsEval:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return eval, (self.code,)


def _payloads(marker: Path) -> dict[str, tuple[str, Callable[[bytes], bytes]]]:
    """Name -> (global the pickle names, data.pkl rewriter). Each payload would create ``marker`` if it ran."""
    command = f"touch {shlex.quote(str(marker))}"
    code = f"open({str(marker)!r}, 'w').close()"
    os_system = b"cos\nsystem\n" + _binunicode(command) + b"\x85R"  # GLOBAL, arg, TUPLE1, REDUCE
    return {
        "os.system-alone": ("os.system", lambda _: b"\x80\x02" + os_system + b"."),
        # after the whole legitimate module tree, result popped so that STOP still returns the real root
        "os.system-after-real-tree": ("os.system", lambda real: real[:-1] + os_system + b"0."),
        "builtins.eval": ("builtins.eval", lambda _: pickle.dumps(_CallsEval(code), protocol=3)),
        # protocol 2 writes Python 2's module name; still refused, under the name the pickle uses
        "__builtin__.eval": ("__builtin__.eval", lambda _: pickle.dumps(_CallsEval(code), protocol=2)),
        "builtins.eval-stack-global": ("builtins.eval", lambda _: pickle.dumps(_CallsEval(code), protocol=4)),
        "posix.system-reduce": ("posix.system", lambda _: pickle.dumps(_CallsSystem(command), protocol=2)),
    }


@pytest.mark.parametrize("payload", list(_payloads(Path("unused"))))
def test_foreign_globals_are_refused_before_running(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "pwned"
    global_name, rewrite = _payloads(marker)[payload]
    crafted = _replace_data_pickle(_small_archive(tmp_path), tmp_path / "crafted.pt", rewrite)
    assert is_torchscript_archive(crafted)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(f"refusing to load global {global_name} ")):
        read_torchscript_state_dict(crafted)
    assert not marker.exists()


def test_payloads_would_have_run(tmp_path: Path) -> None:
    """Guard for the test above: unpickled normally, a payload does create the marker."""
    marker = tmp_path / "pwned"
    pickle.loads(_payloads(marker)["builtins.eval"][1](b""))
    assert marker.exists()


def test_truncated_archive(tmp_path: Path) -> None:
    real = _small_archive(tmp_path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    assert not is_torchscript_archive(truncated)
    with pytest.raises(CheckpointError, match=re.escape(str(truncated))):
        read_torchscript_state_dict(truncated)


def test_corrupt_storage_bytes(tmp_path: Path) -> None:
    real = _small_archive(tmp_path)
    with zipfile.ZipFile(real) as zf:
        info = max(zf.infolist(), key=lambda i: i.file_size)  # a storage under data/
    raw = bytearray(real.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)  # from the local file header
    start = info.header_offset + 30 + name_len + extra_len
    raw[start : start + 16] = bytes(16)  # not what the CRC says
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=re.escape(str(corrupt))):
        read_torchscript_state_dict(corrupt)


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"definitely not a zip archive")
    assert not is_torchscript_archive(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_torchscript_state_dict(path)
    assert not is_torchscript_archive(tmp_path / "missing.pt")


def test_missing_storage_record(tmp_path: Path) -> None:
    real = _small_archive(tmp_path)
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(broken, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("/data/0"):
                dst.writestr(info, src.read(info))
    with pytest.raises(CheckpointError, match="storage '0'"):
        read_torchscript_state_dict(broken)


def test_torch_save_zip_is_not_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "state_dict.pt"
    torch.save(_reference_clip(VIT_ARGS).state_dict(), path)
    assert zipfile.is_zipfile(path)
    assert not is_torchscript_archive(path)
    with pytest.raises(CheckpointError, match="not a TorchScript archive"):
        read_torchscript_state_dict(path)
