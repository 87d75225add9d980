"""CLIP: an image tower and a text tower projected into one embedding space, compared by cosine similarity.

Contract of the public verbs:
- ``encode_image(images [B, 3, R, R] float) -> [B, embed_dim]`` (unit L2 norm when ``normalize=True``)
- ``encode_text(tokens [B, context_length] int64) -> [B, embed_dim]``; the feature is read at each row's
  end-of-text token, found as the row's largest id (the end token, 49407, is the largest id in the vocabulary).
- ``forward(images, tokens) -> (logits_per_image [B_i, B_t], logits_per_text [B_t, B_i])``, cosine
  similarities scaled by ``logit_scale.exp()``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig, ModelConfig, SigLIPConfig, XLMRobertaCLIPConfig
from .resnet import ModifiedResNet
from .siglip import SigLIP
from .transformer import LayerNorm, Transformer
from .vision_transformer import VisionTransformer
from .xlm_roberta import XLMRobertaCLIP

INITIAL_TEMPERATURE = 0.07  # logit_scale starts at log(1 / 0.07), as in the CLIP paper


class CLIP(nn.Module):
    """The CLIP model described by ``config``; parameter names are OpenAI's checkpoint keys."""

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        self.config = config
        text = config.text
        self.context_length = text.context_length
        self.visual: nn.Module
        if config.vision.is_resnet:
            self.visual = ModifiedResNet(config.vision, config.embed_dim)
        else:
            self.visual = VisionTransformer(config.vision, config.embed_dim, config.activation)
        self.transformer = Transformer(
            text.width, text.layers, text.heads, text.mlp_width or 4 * text.width, config.activation
        )
        self.token_embedding = nn.Embedding(text.vocab_size, text.width)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width))
        self.ln_final = LayerNorm(text.width)
        self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INITIAL_TEMPERATURE)))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Random init for training from scratch: CLIP's scheme (small normal embeddings, depth-scaled projections)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        towers = [self.transformer]
        if isinstance(self.visual, VisionTransformer):
            towers.append(self.visual.transformer)
        else:
            std = self.visual.get_parameter("attnpool.c_proj.weight").shape[1] ** -0.5  # c_proj's in_features
            for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
                nn.init.normal_(self.visual.get_parameter(f"attnpool.{name}.weight"), std=std)
            for name, param in self.visual.named_parameters():
                if name.endswith("bn3.weight") and name.startswith("layer"):
                    nn.init.zeros_(param)  # each residual block starts as the identity
        for tower in towers:
            width, depth = tower.width, len(tower.resblocks)
            proj_std, attn_std, fc_std = width**-0.5 * (2 * depth) ** -0.5, width**-0.5, (2 * width) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.get_parameter("attn.in_proj_weight"), std=attn_std)
                nn.init.normal_(block.get_parameter("attn.out_proj.weight"), std=proj_std)
                nn.init.normal_(block.get_parameter("mlp.c_fc.weight"), std=fc_std)
                nn.init.normal_(block.get_parameter("mlp.c_proj.weight"), std=proj_std)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

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
        """Encode token ids. Args: text [B, L<=context_length] int64. Returns [B, embed_dim]; unit-norm if normalize."""
        B, L = text.shape  # batch, tokens
        x = self.token_embedding(text) + self.positional_embedding[:L].to(self.dtype)  # [B, L, width]
        x = self.ln_final(self.transformer(x, causal=True))  # [B, L, width]
        eot = x[torch.arange(B, device=x.device), text.argmax(dim=-1)]  # [B, width]
        features = eot @ self.text_projection  # [B, embed_dim]
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine similarities: (logits_per_image [B_i, B_t], logits_per_text [B_t, B_i])."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer activations in the backward pass to save memory when training."""
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable


ImageTextModel = CLIP | SigLIP | XLMRobertaCLIP  # what clip_model.load returns: the same encoders and attributes


def model_for(config: ModelConfig) -> ImageTextModel:
    """The model of ``config``'s family, randomly initialised (or on the meta device, under ``torch.device``)."""
    if isinstance(config, SigLIPConfig):
        return SigLIP(config)
    if isinstance(config, XLMRobertaCLIPConfig):
        return XLMRobertaCLIP(config)
    return CLIP(config)
