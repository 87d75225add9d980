"""SigLIP and SigLIP 2 (fixed resolution): CLIP's two towers with SigLIP's pooling, scored by a sigmoid.

Contract of the public verbs (the same as :class:`clip_model.model.CLIP`'s):

- ``encode_image(images [B, 3, R, R] float) -> [B, embed_dim]`` (unit L2 norm when ``normalize=True``). The patch
  grid is ``R // patch_size`` a side: a 384 input with 14-pixel patches uses its top-left 378 x 378 pixels, as the
  reference's unpadded convolution does.
- ``encode_text(tokens [B, context_length] int64) -> [B, embed_dim]``. Rows must be padded to the full context
  length: the text tower attends in both directions, padding included, and the feature is read at the last
  position, so a trimmed row gives another embedding (a shorter row raises ``ValueError``).
- ``forward(images, tokens) -> (logits_per_image [B_i, B_t], logits_per_text [B_t, B_i])`` with
  ``logit = logit_scale.exp() * cosine + logit_bias``; ``sigmoid(logit)`` is the probability that the pair matches,
  independently of the other pairs.

Parameter names are CLIP's where the part is the same (``transformer.resblocks``, ``ln_final``, ``visual.conv1``,
``visual.positional_embedding``, ``visual.ln_post``); the image tower has no class token and no projection, and
pools with :class:`AttentionPool`; ``text_projection`` is a linear layer with bias; ``logit_scale`` and
``logit_bias`` are scalars. :mod:`clip_model.siglip_convert` maps OpenCLIP's and Hugging Face's layouts to these.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import Activation, SigLIPConfig, VisionConfig
from .transformer import LayerNorm, Transformer, make_activation

INITIAL_LOGIT_SCALE = math.log(10.0)  # SigLIP's initial temperature and bias, for training from scratch
INITIAL_LOGIT_BIAS = -10.0
EMBEDDING_STD = 0.02  # random init of token embeddings, as CLIP's


def _mlp(width: int, mlp_width: int, activation: Activation) -> nn.Sequential:
    layers = [("c_fc", nn.Linear(width, mlp_width)), ("gelu", make_activation(activation))]
    return nn.Sequential(OrderedDict([*layers, ("c_proj", nn.Linear(mlp_width, width))]))


class AttentionPool(nn.Module):
    """Multihead attention pooling ("MAP"): one learned ``probe`` attends over the tokens, then a residual MLP.

    ``[B, N, W]`` tokens -> ``[B, W]``. ``in_proj_weight`` [3W, W] stacks the query, key and value projections (the
    query is applied to the probe, keys and values to the tokens), as ``nn.MultiheadAttention`` holds them;
    ``x = out_proj(attention)``, then ``x + mlp(ln(x))``.
    """

    def __init__(self, width: int, heads: int, mlp_width: int, activation: Activation, eps: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.probe = nn.Parameter(torch.empty(width))
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.ln = LayerNorm(width, eps=eps)
        self.mlp = _mlp(width, mlp_width, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, N, W] -> [B, W]
        B, N, W = x.shape  # batch, tokens, width
        H = self.heads
        w_q, w_kv = self.in_proj_weight[:W], self.in_proj_weight[W:]  # [W, W], [2W, W]
        b_q, b_kv = self.in_proj_bias[:W], self.in_proj_bias[W:]
        q = F.linear(self.probe.to(x.dtype), w_q, b_q).view(1, H, 1, W // H).expand(B, H, 1, W // H)  # [B, H, 1, W/H]
        k, v = F.linear(x, w_kv, b_kv).view(B, N, 2, H, W // H).permute(2, 0, 3, 1, 4)  # each [B, H, N, W/H]
        pooled = F.scaled_dot_product_attention(q, k, v).reshape(B, W)  # [B, W]
        pooled = self.out_proj(pooled)
        out: torch.Tensor = pooled + self.mlp(self.ln(pooled))
        return out


class SigLIPVisionTransformer(nn.Module):
    """``[B, 3, R, R]`` images -> ``[B, width]`` features: patches (conv with bias) + positions, transformer,
    ``ln_post`` on every token, then :class:`AttentionPool`. No class token, no ``ln_pre``, no projection."""

    def __init__(self, cfg: VisionConfig, activation: Activation, eps: float) -> None:
        super().__init__()
        if cfg.patch_size is None or not isinstance(cfg.layers, int):
            raise ValueError("a SigLIP image tower is a ViT: it needs patch_size and an int number of layers")
        width, grid = cfg.width, cfg.image_size // cfg.patch_size
        mlp_width = cfg.mlp_width or 4 * width
        self.input_resolution = cfg.image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid, width))
        self.transformer = Transformer(width, cfg.layers, cfg.heads, mlp_width, activation, eps)
        self.ln_post = LayerNorm(width, eps=eps)
        self.attn_pool = AttentionPool(width, cfg.heads, mlp_width, activation, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 3, R, R] -> [B, W]
        x = self.conv1(x)  # [B, W, grid, grid]
        x = x.flatten(2).transpose(1, 2) + self.positional_embedding.to(x.dtype)  # [B, grid*grid, W]
        x = self.ln_post(self.transformer(x))
        features: torch.Tensor = self.attn_pool(x)
        return features


class SigLIP(nn.Module):
    """The SigLIP model described by ``config`` (see the module docstring for the contract and names).

    ``tokenizer_path`` is the SentencePiece vocabulary the weights were trained with, when :func:`clip_model.load`
    found one beside them (:func:`clip_model.tokenizer_for` reads it); it is not part of the state dict.
    """

    def __init__(self, config: SigLIPConfig) -> None:
        super().__init__()
        if config.embed_dim != config.vision.width:
            raise ValueError(f"SigLIP's image tower is not projected: embed_dim {config.embed_dim} must equal "
                             f"the vision width {config.vision.width}")  # fmt: skip
        self.config = config
        text, eps = config.text, config.layer_norm_eps
        self.context_length = text.context_length
        self.tokenizer_path: Path | None = None
        self.visual = SigLIPVisionTransformer(config.vision, config.activation, eps)
        mlp_width = text.mlp_width or 4 * text.width
        self.transformer = Transformer(text.width, text.layers, text.heads, mlp_width, config.activation, eps)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.ln_final = LayerNorm(text.width, eps=eps)
        self.text_projection = nn.Linear(text.width, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))
        self.logit_bias = nn.Parameter(torch.tensor(INITIAL_LOGIT_BIAS))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Random init for training from scratch: small normal embeddings and probe, xavier pooling projections."""
        nn.init.normal_(self.token_embedding.weight, std=EMBEDDING_STD)
        nn.init.normal_(self.positional_embedding, std=self.config.text.width**-0.5)
        nn.init.normal_(self.visual.positional_embedding, std=self.config.vision.width**-0.5)
        nn.init.normal_(self.visual.attn_pool.probe, std=self.config.vision.width**-0.5)
        nn.init.xavier_uniform_(self.visual.attn_pool.in_proj_weight)
        nn.init.normal_(self.text_projection.weight, std=self.config.text.width**-0.5)
        nn.init.zeros_(self.text_projection.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Encode preprocessed images. Args: image [B, 3, R, R] float. Returns [B, embed_dim]; unit if normalize."""
        features = self.visual(image.to(self.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Encode token ids. Args: text [B, context_length] int64, padded as the tokenizer pads.
        Returns [B, embed_dim]; unit-norm if normalize. Raises ValueError for rows of another length."""
        B, L = text.shape  # batch, tokens
        if L != self.context_length:
            raise ValueError(f"SigLIP reads the last of {self.context_length} positions: pass token rows padded to "
                             f"the context length (as its tokenizer returns them), not {L}")  # fmt: skip
        x = self.token_embedding(text) + self.positional_embedding.to(self.dtype)  # [B, L, width]
        x = self.transformer(x)  # no causal mask: every position sees the whole row
        features: torch.Tensor = self.text_projection(self.ln_final(x[:, -1]))  # [B, embed_dim]
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid logits ``scale * cos + bias``: (logits_per_image [B_i, B_t], logits_per_text [B_t, B_i])."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t() + self.logit_bias
        return logits_per_image, logits_per_image.t()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer activations in the backward pass to save memory when training."""
        self.transformer.grad_checkpointing = enable
        self.visual.transformer.grad_checkpointing = enable
