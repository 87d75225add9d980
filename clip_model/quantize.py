"""int8 CPU inference: dynamic quantization of the linear layers of both towers.

:func:`quantize_int8` returns a copy of a CLIP whose attention projections (the fused q/k/v ``in_proj`` and
``out_proj``), MLP layers (``c_fc``, ``c_proj``) and, for ResNet towers, attention-pool projections are
:class:`Int8Linear` modules (inside :class:`Int8SelfAttention` and :class:`Int8MLP`). Everything else stays
float32: LayerNorm, embeddings, the patch-embedding and ResNet convolutions, attention itself
(``scaled_dot_product_attention``) and the two final ``[width, embed_dim]`` projections (they see one row per
input, under 1% of the work).

Method. Weights: symmetric int8 with one scale per output channel, ``scale = max|w| / 127``, computed once.
Activations: symmetric int8 with one scale per token (row), computed at every call. The product runs as
``torch._int_mm`` (int8 x int8 -> int32; oneDNN, AMX/VNNI where the CPU has them), then
``out = acc * token_scale * channel_scale + bias`` in float32. Outputs keep the encoders' contracts:
``encode_image``/``encode_text`` return float32 ``[B, embed_dim]``, unit-norm with ``normalize=True``.

Why this method: against ``torch.ao.quantization.quantize_dynamic`` (fbgemm, per-tensor activations, with or
without per-channel weights), per-token scales are closer to float32 and, from batch 8 up, faster; fbgemm fuses its
element-wise quantize/dequantize passes, which is why it wins at batch 1, and ``torch.compile`` fuses ours.
bfloat16 ``F.linear`` needs AMX, while int8 also has VNNI kernels on CPUs without AMX. ``torch.ao.quantization``
is also deprecated in torch 2.13 (its quantized tensor types are to be removed) and cannot see the fused
``in_proj`` matrix. Left unchunked, the element-wise passes over ``[M, out]`` tensors cost about as much as the
int8 matmuls, hence ``CHUNK_ROWS_PER_THREAD``. The towers' speed against float32 is the bench's "encoders"
member, retrieval quality against float32 its "int8_quality" member (see bench/README.md).
The quantized model is for inference only (no autograd through ``_int_mm``) and CPU only.
"""

from __future__ import annotations

import torch
from torch import nn

from .inference_copy import swapped_copy
from .model import ImageTextModel
from .transformer import ProjectedSelfAttention, ResidualAttentionBlock, SelfAttention

INT8_MAX = 127  # symmetric range [-127, 127]: -128 is never produced, so negation cannot overflow
MIN_SCALE = 1e-12  # scale of an all-zero row or channel, so that 0 / scale stays 0
# Rows per step in eager mode, per torch thread: a chunk's activations ([128, 3072] float32 = 1.5 MiB a thread)
# stay in the L2 cache from quantize through matmul, dequantize and (in Int8MLP) the activation and the next
# layer's quantize. Rows are independent and the int32 products exact, so chunking changes no bit of the result.
# 128 and 256 rows are the fastest chunks on a ViT-B/32 MLP at batch 32 (64 and 512 are slower, the whole batch
# slowest).
CHUNK_ROWS_PER_THREAD = 128


def _chunk_rows() -> int:
    return CHUNK_ROWS_PER_THREAD * torch.get_num_threads()


class Int8Linear(nn.Module):
    """``y = x @ weight.T + bias`` with an int8 weight (per-output-channel scales) and per-token int8 activations.

    Buffers: ``qweight`` [out, in] int8, ``weight_scale`` [out] float32, ``bias`` [out] float32 or None.
    Input ``[..., in]`` float (computed in float32); output ``[..., out]`` float32.
    """

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(MIN_SCALE) / INT8_MAX  # [out]
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize an ``nn.Linear``'s weight; its bias is kept in float32."""
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out] float32
        rows = x.reshape(-1, self.in_features).float()  # [M, in]
        if torch.compiler.is_compiling():  # inductor fuses the element-wise passes itself: no chunks needed
            return self.rows(rows).view(*x.shape[:-1], self.out_features)
        out, step = rows.new_empty(rows.shape[0], self.out_features), _chunk_rows()  # [M, out]
        for chunk, out_chunk in zip(torch.split(rows, step), torch.split(out, step), strict=True):
            self.rows(chunk, out=out_chunk)
        return out.view(*x.shape[:-1], self.out_features)

    def rows(self, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``rows`` [M, in] float32 -> [M, out] float32 (into ``out`` if given): quantize, int8 matmul, dequantize."""
        peak = torch.maximum(rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True).neg_())  # [M, 1]
        token_scale = peak.clamp_min_(MIN_SCALE).div_(INT8_MAX)  # [M, 1]; no abs(): one temporary less
        qrows = (rows / token_scale).round_().to(torch.int8)  # |rows / scale| <= 127 by construction
        acc = torch._int_mm(qrows, self.qweight.t())  # [M, out] int32, exact
        out = acc.float() if out is None else out.copy_(acc)  # copy_ then mul_ beats one mixed-dtype mul
        out.mul_(token_scale)
        if self.bias is None:
            return out.mul_(self.weight_scale)
        return torch.addcmul(self.bias, out, self.weight_scale, out=out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8SelfAttention(ProjectedSelfAttention):
    """:class:`~clip_model.transformer.SelfAttention` with int8 ``in_proj`` and ``out_proj``; same forward contract."""

    def __init__(self, attn: SelfAttention) -> None:
        in_proj = Int8Linear(attn.in_proj_weight, attn.in_proj_bias)
        super().__init__(attn.heads, in_proj, Int8Linear.from_linear(attn.out_proj))


class Int8MLP(nn.Module):
    """A block's MLP (``c_fc`` -> activation -> ``c_proj``) with int8 layers, run in chunks of rows."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        c_fc, c_proj = mlp.get_submodule("c_fc"), mlp.get_submodule("c_proj")
        if not isinstance(c_fc, nn.Linear) or not isinstance(c_proj, nn.Linear):
            raise TypeError(f"expected a block MLP with Linear c_fc and c_proj, got {mlp}")
        self.c_fc = Int8Linear.from_linear(c_fc)
        self.gelu = mlp.get_submodule("gelu")  # QuickGELU or nn.GELU, as the float model has it
        self.c_proj = Int8Linear.from_linear(c_proj)

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.gelu(x)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, L, W] -> [B, L, W] float32
        rows = x.reshape(-1, x.shape[-1]).float()  # [M, W]
        if torch.compiler.is_compiling():
            return self.c_proj.rows(self.activation(self.c_fc.rows(rows))).view(x.shape)
        out, step = torch.empty_like(rows), _chunk_rows()
        for chunk, out_chunk in zip(torch.split(rows, step), torch.split(out, step), strict=True):
            self.c_proj.rows(self.activation(self.c_fc.rows(chunk)), out=out_chunk)
        return out.view(x.shape)


def _quantize_children(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, ResidualAttentionBlock):
            setattr(child, "attn", Int8SelfAttention(child.attn))  # noqa: B010  # the float attribute type differs
            setattr(child, "mlp", Int8MLP(child.mlp))  # noqa: B010  # as above
        elif isinstance(child, SelfAttention):
            setattr(module, name, Int8SelfAttention(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
        else:
            _quantize_children(child)


def quantize_int8(model: ImageTextModel) -> ImageTextModel:
    """An int8 copy of ``model`` for CPU inference; ``model`` itself is left unchanged.

    Every ``nn.Linear`` and every fused attention projection of both towers becomes an :class:`Int8Linear` (see
    the module docstring for what stays float32). The copy is in eval mode with ``requires_grad`` off; its
    ``encode_image`` / ``encode_text`` keep their contracts (float32 ``[B, embed_dim]`` out). Its state dict holds
    int8 buffers, so save the float32 model, not this one, and quantize again after loading.

    Raises:
        ValueError: ``model`` is not on the CPU, or not float32.
    """
    return swapped_copy(model, _quantize_children, "int8 quantization")


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds :class:`Int8Linear` layers (made by :func:`quantize_int8`)."""
    return any(isinstance(m, Int8Linear) for m in model.modules())
