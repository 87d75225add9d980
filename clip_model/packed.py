"""float32 CPU inference with the linear layers in oneDNN's packed weight layout.

:func:`pack_for_cpu` returns a copy of a CLIP whose linear layers (attention ``in_proj`` / ``out_proj``, MLP
``c_fc`` / ``c_proj``, the ResNet attention pool's projections) are :class:`PackedLinear` modules: the same float32
weights, reordered once into oneDNN's blocked layout and multiplied by its matmul (``torch.ops.mkldnn``, the
kernels inductor uses when it freezes a model) instead of re-reading a row-major matrix through BLAS at every call.
Everything else is the float model's own. The arithmetic stays float32: outputs agree with the float model to
float rounding (another summation order), the encoders keep their contracts.

Why: the large MLP and attention matrices are the bulk of a tower's work, and a packed layer multiplies them
faster than ``F.linear`` (MKL) does; a packed image tower is faster than ``transformers`` float32 on the same
weights, where the plain float model only matches it (see bench/README.md, "encoders").

The packed copy is for inference only (the packed weights take no gradient) and CPU only; its state dict lacks
the packed weights: save the float model. Where this torch has no oneDNN, :func:`pack_for_cpu` says so in the log
and returns the model as it is (the same results, BLAS speed).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .inference_copy import check_float32_cpu, swapped_copy
from .model import ImageTextModel
from .transformer import ProjectedSelfAttention, SelfAttention

logger = logging.getLogger(__name__)
NO_ACTIVATION = "none"  # _linear_pointwise's fused element-wise op: none


class PackedLinear(nn.Module):
    """``y = x @ weight.T + bias`` with ``weight`` [out, in] float32 held in oneDNN's packed layout.

    Input ``[..., in]`` float32 (any strides); output ``[..., out]`` float32. ``bias`` [out] is a buffer; the packed
    weight is a plain attribute (an opaque oneDNN tensor: not in the state dict, not moved by ``.to()``)."""

    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, NO_ACTIVATION, [], "")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedSelfAttention(ProjectedSelfAttention):
    """:class:`~clip_model.transformer.SelfAttention` with packed ``in_proj`` and ``out_proj``; same contract."""

    def __init__(self, attn: SelfAttention) -> None:
        in_proj = PackedLinear(attn.in_proj_weight, attn.in_proj_bias)
        super().__init__(attn.heads, in_proj, PackedLinear.from_linear(attn.out_proj))


@functools.cache
def packing_available() -> bool:
    """Whether this torch can pack and run a linear layer through oneDNN on this CPU (checked once, on a tiny one)."""
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]  # torch leaves it unannotated
        return False
    try:
        layer = PackedLinear(torch.ones(2, 3), torch.zeros(2))
        with torch.inference_mode():
            return bool(torch.equal(layer(torch.ones(1, 3)), torch.full((1, 2), 3.0)))
    except (RuntimeError, AttributeError, NotImplementedError) as exc:
        logger.info("oneDNN linear layers unavailable: %s", exc)
        return False


def _pack_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, SelfAttention):
            setattr(module, name, PackedSelfAttention(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear.from_linear(child))
        else:
            _pack_children(child)


def pack_for_cpu(model: ImageTextModel) -> ImageTextModel:
    """A copy of a float32 CPU ``model`` for inference, with packed linear layers; ``model`` is left unchanged.

    The copy is in eval mode with ``requires_grad`` off, and keeps the encoders' contracts (float32
    ``[B, embed_dim]``). Without oneDNN (logged), ``model`` itself is returned in eval mode.

    Raises:
        ValueError: ``model`` is not on the CPU, or not float32.
    """
    check_float32_cpu(model, "packing linear layers")
    if not packing_available():
        logger.warning("this torch has no oneDNN linear layers: the float32 model runs as it is (BLAS matmuls)")
        return model.eval()
    return swapped_copy(model, _pack_children, "packing linear layers")


def is_packed(model: nn.Module) -> bool:
    """Whether ``model`` holds :class:`PackedLinear` layers (made by :func:`pack_for_cpu`)."""
    return any(isinstance(m, PackedLinear) for m in model.modules())
