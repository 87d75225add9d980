"""Transformer blocks shared by the text tower and the ViT image tower.

Module and parameter names follow OpenAI's checkpoint keys (``attn.in_proj_weight``, ``ln_1``, ``mlp.c_fc``,
``mlp.c_proj``, ``resblocks``) so their state dicts load with ``strict=True`` and no key map. Activations are
batch-first: ``[B, L, width]`` throughout (the reference works in ``[L, B, width]``; the weights do not care).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import Activation

QUICK_GELU_SCALE = 1.702  # sigmoid(1.702 x) approximates the Gaussian CDF in GELU
LAYER_NORM_EPS = 1e-5  # OpenAI's and OpenCLIP's CLIP towers; SigLIP's use 1e-6 (its config says)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, cast back afterwards (safe under fp16/bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation OpenAI's CLIP checkpoints were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def make_activation(name: Activation) -> nn.Module:
    """The MLP activation a config names: ``"quick_gelu"`` (OpenAI), ``"gelu"`` (exact erf GELU, OpenCLIP) or
    ``"gelu_tanh"`` (GELU's tanh approximation, which SigLIP was trained with)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"unknown activation {name!r}; expected 'quick_gelu', 'gelu' or 'gelu_tanh'")


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection, computed by ``scaled_dot_product_attention``.

    Holds ``in_proj_weight`` [3W, W], ``in_proj_bias`` [3W] (q, k, v stacked in that order) and ``out_proj``,
    the same tensors as ``nn.MultiheadAttention``.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:  # x: [B, L, W] -> [B, L, W]
        B, L, W = x.shape  # batch, sequence length, width
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3W]
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # each [B, H, L, W/H]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, L, W/H]
        projected: torch.Tensor = self.out_proj(out.transpose(1, 2).reshape(B, L, W))
        return projected


class ProjectedSelfAttention(nn.Module):
    """:class:`SelfAttention`'s computation with its two projections as modules: the inference copies of a model
    (int8 in :mod:`.quantize`, oneDNN-packed in :mod:`.packed`) put their own linear layers in.

    ``in_proj``: ``[..., W] -> [..., 3W]`` (q, k, v stacked in that order); ``out_proj``: ``[..., W] -> [..., W]``.
    """

    def __init__(self, heads: int, in_proj: nn.Module, out_proj: nn.Module) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = in_proj
        self.out_proj = out_proj

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:  # x: [B, L, W] -> [B, L, W]
        B, L, W = x.shape  # batch, sequence length, width
        qkv = self.in_proj(x)  # [B, L, 3W]
        q, k, v = qkv.view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # each [B, H, L, W/H]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, L, W/H]
        projected: torch.Tensor = self.out_proj(out.transpose(1, 2).reshape(B, L, W))
        return projected


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(
        self, width: int, heads: int, mlp_width: int, activation: Activation, eps: float = LAYER_NORM_EPS
    ) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=eps)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, mlp_width)),
                    ("gelu", make_activation(activation)),
                    ("c_proj", nn.Linear(mlp_width, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:  # x: [B, L, W]
        x = x + self.attn(self.ln_1(x), causal=causal)
        out: torch.Tensor = x + self.mlp(self.ln_2(x))
        return out


class Transformer(nn.Module):
    """A stack of ``layers`` residual attention blocks; ``causal=True`` lets token i attend to tokens <= i only."""

    def __init__(
        self, width: int, layers: int, heads: int, mlp_width: int, activation: Activation, eps: float = LAYER_NORM_EPS
    ) -> None:
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width, activation, eps) for _ in range(layers)
        )
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:  # x: [B, L, W] -> [B, L, W]
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal=causal)
        return x
