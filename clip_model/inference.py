"""One way to get a model ready for inference: load, fingerprint, then make the inference copy for its device.

The indexer, the server and the benchmarks all start here, so an index and the server that answers over it always
agree on what "the same model" means: the fingerprint is the sha256 of the float32 weights as loaded, taken before
the inference copy is made, so an index built in fp32 and a server running int8 or fp16 on CUDA (or the other way
round) share it.

The copy depends on the placement, which :mod:`clip_model.device` decides from the device and precision settings:

* CPU, fp32: float32 linear layers packed for oneDNN (:func:`~clip_model.packed.pack_for_cpu`); CPU, int8: int8
  linear layers (:func:`~clip_model.quantize.quantize_int8`). Inputs and outputs are CPU tensors, as ever.
* CUDA: the weights cast to the placement's dtype and moved to the device (:func:`on_device`), the encoders wrapped so
  that the device stays inside them. Callers (the indexer's pipeline, the server's encoder) need no device code.

Either way ``encode_image`` / ``encode_text`` take CPU tensors and return CPU float32 ``[B, embed_dim]``, unit rows
with ``normalize=True``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import weights_sha256
from .device import InferencePrecision, Placement, resolve_placement
from .factory import load
from .model import ImageTextModel
from .packed import pack_for_cpu
from .preprocess import Preprocess
from .quantize import quantize_int8
from .transformer import LayerNorm

Encode = Callable[..., torch.Tensor]  # encode_image / encode_text: (inputs, normalize=False) -> [B, embed_dim]


@dataclass(frozen=True)
class InferenceModel:
    """A model ready for inference and what callers record about it.

    ``model`` is in eval mode with gradients off, made for ``device`` in ``precision`` (module docstring): on the CPU
    int8 linear layers for ``"int8"``, float32 ones packed for oneDNN for ``"fp32"`` (the same results as the plain
    model, to rounding); on CUDA float16 (``"fp16"``) or float32 weights. ``name`` is the registry name, or the
    checkpoint's absolute path (valid from any working directory). ``weights_sha256`` fingerprints the float32
    weights as loaded. ``device`` is ``"cpu"`` or ``"cuda:N"``.
    """

    model: ImageTextModel
    preprocess: Preprocess
    name: str
    weights_sha256: str
    precision: InferencePrecision
    device: str = "cpu"

    @property
    def embed_dim(self) -> int:
        """Length of the (L2-normalized) embeddings both towers return."""
        return int(self.model.config.embed_dim)

    @property
    def context_length(self) -> int:
        """Tokens per text, end-of-text included."""
        return int(self.model.config.text.context_length)

    def provenance(self) -> dict[str, Any]:
        """What an index records about the embeddings: name, weights fingerprint, dim and preprocessing (not the
        device or the precision: every placement's embeddings count as the same model's)."""
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "embed_dim": self.embed_dim,
            "image_size": self.preprocess.image_size,
            "mean": self.preprocess.mean,
            "std": self.preprocess.std,
        }


def load_for_inference(
    name_or_path: str | Path, *, arch: str | None = None, precision: str | None = None, device: str = "cpu"
) -> InferenceModel:
    """Load a model (as :func:`clip_model.load` reads it) and make its inference copy for ``device`` and
    ``precision``, the device and precision settings (:func:`clip_model.device.resolve_placement`; ``precision``
    None: the device's default, fp32 on the CPU and fp16 on CUDA).

    Raises ValueError for a device or precision the rule refuses (naming the settings), and what
    :func:`clip_model.load` raises for a model it cannot read.
    """
    placement = resolve_placement(device, precision)  # first: a refused setting reads no weights
    model, preprocess = load(name_or_path, arch=arch)
    fingerprint = weights_sha256(model)
    copy = _inference_copy(model, placement)
    path = Path(name_or_path).expanduser()
    name = str(path.resolve()) if path.exists() else str(name_or_path)
    return InferenceModel(copy, preprocess, name, fingerprint, placement.precision, str(placement.device))


def _inference_copy(model: ImageTextModel, placement: Placement) -> ImageTextModel:
    if placement.device.type != "cpu":
        return on_device(model, placement.device, placement.dtype)
    return quantize_int8(model) if placement.precision == "int8" else pack_for_cpu(model)


def on_device(model: ImageTextModel, device: torch.device, dtype: torch.dtype) -> ImageTextModel:
    """``model`` itself, for inference on ``device`` in ``dtype``: its floating-point weights cast to ``dtype``
    (clip_model's LayerNorms keep float32 weights: they compute in float32) and moved to ``device``, in eval mode
    with gradients off. Its scalars (``logit_scale``, a SigLIP's ``logit_bias``) stay float32 on the CPU: they scale
    the CPU similarities of the encoders' outputs (:func:`clip_model.zero_shot_probabilities`).

    Its ``encode_image`` and ``encode_text`` become the device boundary: inputs on any device are moved to
    ``device``, and the result comes back as a CPU float32 ``[B, embed_dim]`` tensor, L2-normalized in float32 when
    ``normalize=True``; ``forward`` calls them, so its logits are CPU tensors too. The submodules run on ``device``
    as they are. Wrapping an already wrapped model is refused (``ValueError``): load it again instead.
    """
    if "encode_image" in vars(model):
        raise ValueError("this model's encoders already run on a device of their own (on_device was applied)")
    model = model.to(device).eval().requires_grad_(False)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LayerNorm):
                continue
            for param in module.parameters(recurse=False):
                if param.dim() == 0:
                    param.data = param.data.to("cpu", torch.float32)
                elif param.is_floating_point():
                    param.data = param.data.to(dtype)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer.is_floating_point():
                    setattr(module, name, buffer.to(dtype))
    # instance attributes shadow the class's encoders: the object stays the model callers type it as
    setattr(model, "encode_image", _device_boundary(model.encode_image, device))  # noqa: B010  # see above
    setattr(model, "encode_text", _device_boundary(model.encode_text, device))  # noqa: B010  # see above
    return model


def _device_boundary(encode: Encode, device: torch.device) -> Encode:
    """``encode`` taking inputs from anywhere and giving CPU float32 rows (normalized in float32 on request)."""

    @functools.wraps(encode)
    def encode_on_device(inputs: torch.Tensor, normalize: bool = False) -> torch.Tensor:  # [B, ...] -> [B, D]
        features = encode(inputs.to(device, non_blocking=True), normalize=False).float()
        return (F.normalize(features, dim=-1) if normalize else features).cpu()

    return encode_on_device
