"""OpenCLIP's multilingual CLIP: a CLIP image tower beside an XLM-RoBERTa text tower.

Contract of the public verbs (the same as :class:`clip_model.model.CLIP`'s):

- ``encode_image(images [B, 3, R, R] float) -> [B, embed_dim]``, CLIP's ViT.
- ``encode_text(tokens [B, L] int64) -> [B, embed_dim]``, ``L <= max_positions - pad_token_id - 1`` (512): rows as
  the XLM-RoBERTa tokenizer writes them (``<s>`` 0, ids, ``</s>`` 2, ``<pad>`` 1). Padding is masked out of the
  attention and of the mean, so a row's feature does not depend on how much padding follows it.
- ``forward(images, tokens)``: CLIP's scaled cosine similarities.

Parameter names are OpenCLIP's (``text.transformer`` is Hugging Face's ``XLMRobertaModel`` without its pooling
layer, ``text.proj.0`` / ``text.proj.2`` the projection MLP, ``visual.*`` CLIP's), so OpenCLIP's checkpoints load
with no key map and a Hugging Face ``XLMRobertaModel`` state dict loads under ``text.transformer.``.

The text tower: embeddings (word + position + token type 0, then LayerNorm; positions count from
``pad_token_id + 1`` over the non-padding tokens, as fairseq numbers them), then post-LayerNorm blocks
(``x = LN(x + attn(x))``, ``x = LN(x + mlp(x))``, exact GELU), then the mean over non-padding positions.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import XLMRobertaCLIPConfig, XLMRobertaTextConfig
from .vision_transformer import VisionTransformer

INITIAL_TEMPERATURE = 0.07  # logit_scale starts at log(1 / 0.07), as CLIP's
INIT_STD = 0.02  # BERT's initializer_range, for training from scratch


class XLMRobertaEmbeddings(nn.Module):
    """Token ids ``[B, L]`` -> ``[B, L, W]``: word + position + token-type-0 embeddings, then LayerNorm."""

    def __init__(self, cfg: XLMRobertaTextConfig) -> None:
        super().__init__()
        self.pad_token_id = cfg.pad_token_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.width)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.width)
        self.LayerNorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # ids, keep: [B, L] -> [B, L, W]
        positions = torch.cumsum(keep, dim=1) * keep + self.pad_token_id  # padding at pad_token_id, tokens after it
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        out: torch.Tensor = self.LayerNorm(x)
        return out


class _Projection(nn.Module):
    """``x -> LayerNorm(x + dense(h))``: the attention output and the MLP output steps of a block."""

    def __init__(self, width_in: int, width: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(width_in, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(x + self.dense(h))
        return out


class _SelfAttentionProjections(nn.Module):
    """The query, key and value projections, under Hugging Face's names."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:  # Linear, or an inference copy's layer
        return self.query, self.key, self.value


class _Attention(nn.Module):
    def __init__(self, cfg: XLMRobertaTextConfig) -> None:
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        self.heads = cfg.heads
        self.self = _SelfAttentionProjections(cfg.width)
        self.output = _Projection(cfg.width, cfg.width, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # x: [B, L, W], keep: [B, L] bool
        B, L, W = x.shape  # batch, tokens, width
        heads = (p(x).view(B, L, self.heads, W // self.heads).transpose(1, 2) for p in self.self.projections())
        q, k, v = heads  # each [B, H, L, W/H]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])  # [B, H, L, W/H]
        out: torch.Tensor = self.output(attended.transpose(1, 2).reshape(B, L, W), x)
        return out


class _Intermediate(nn.Module):
    def __init__(self, cfg: XLMRobertaTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.width, cfg.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, W] -> [B, L, mlp_width]
        return F.gelu(self.dense(x))


class XLMRobertaLayer(nn.Module):
    """A post-LayerNorm block: ``x = LN(x + attn(x))``, then ``x = LN(x + W2 gelu(W1 x))``; padding keys masked."""

    def __init__(self, cfg: XLMRobertaTextConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _Projection(cfg.mlp_width, cfg.width, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # x: [B, L, W], keep: [B, L] bool
        x = self.attention(x, keep)
        out: torch.Tensor = self.output(self.intermediate(x), x)
        return out


class _Encoder(nn.Module):
    def __init__(self, cfg: XLMRobertaTextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(XLMRobertaLayer(cfg) for _ in range(cfg.layers))


class XLMRobertaModel(nn.Module):
    """Hugging Face's ``XLMRobertaModel`` without the pooling layer: ids ``[B, L]`` -> hidden states ``[B, L, W]``."""

    def __init__(self, cfg: XLMRobertaTextConfig) -> None:
        super().__init__()
        self.embeddings = XLMRobertaEmbeddings(cfg)
        self.encoder = _Encoder(cfg)

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:  # ids, keep: [B, L] -> [B, L, W]
        x: torch.Tensor = self.embeddings(ids, keep.long())
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return x


class XLMRobertaTextTower(nn.Module):
    """Token ids ``[B, L]`` -> ``[B, embed_dim]``: XLM-RoBERTa, mean over non-padding tokens, the MLP ``proj``."""

    def __init__(self, cfg: XLMRobertaTextConfig, embed_dim: int) -> None:
        super().__init__()
        self.pad_token_id = cfg.pad_token_id
        self.max_tokens = cfg.max_positions - cfg.pad_token_id - 1
        hidden = (cfg.width + embed_dim) // 2
        self.transformer = XLMRobertaModel(cfg)
        self.proj = nn.Sequential(
            nn.Linear(cfg.width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, embed_dim, bias=False)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [B, L] -> [B, embed_dim]
        if ids.shape[1] > self.max_tokens:
            raise ValueError(f"XLM-RoBERTa reads at most {self.max_tokens} tokens a row, not {ids.shape[1]}")
        keep = ids != self.pad_token_id  # [B, L]
        x = self.transformer(ids, keep)  # [B, L, W]
        weights = keep.unsqueeze(-1).to(x.dtype)  # [B, L, 1]
        pooled = (x * weights).sum(dim=1) / weights.sum(dim=1)  # [B, W]
        out: torch.Tensor = self.proj(pooled)
        return out


class XLMRobertaCLIP(nn.Module):
    """The model ``config`` describes (see the module docstring for the contract and names)."""

    def __init__(self, config: XLMRobertaCLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.context_length = config.text.context_length
        self.tokenizer_path: Path | None = None  # its SentencePiece vocabulary, as SigLIP.tokenizer_path
        self.visual = VisionTransformer(config.vision, config.embed_dim, config.activation)
        self.text = XLMRobertaTextTower(config.text, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Random init for training from scratch: BERT's normal(0.02) weights, zero biases, unit LayerNorms."""
        for module in self.text.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Encode preprocessed images. Args: image [B, 3, R, R] float. Returns [B, embed_dim]; unit if normalize."""
        features = self.visual(image.to(self.dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Encode token ids. Args: text [B, L] int64, XLM-RoBERTa rows (``<pad>`` = 1 after the text).
        Returns [B, embed_dim]; unit-norm if normalize."""
        features = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities: (logits_per_image [B_i, B_t], logits_per_text [B_t, B_i])."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the image tower's activations in the backward pass to save memory when training."""
        self.visual.transformer.grad_checkpointing = enable
