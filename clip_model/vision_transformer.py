"""ViT image tower: patchify with a strided conv, prepend a class token, transformer, project the class token."""

from __future__ import annotations

import torch
from torch import nn

from .config import Activation, VisionConfig
from .transformer import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    """``[B, 3, R, R]`` images -> ``[B, output_dim]`` features (not normalized). Keys match ``visual.*`` of OpenAI."""

    def __init__(self, cfg: VisionConfig, output_dim: int, activation: Activation) -> None:
        super().__init__()
        if cfg.patch_size is None or cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} must be a multiple of patch_size {cfg.patch_size}")
        assert isinstance(cfg.layers, int)  # guaranteed by the caller's is_resnet dispatch
        width, grid = cfg.width, cfg.image_size // cfg.patch_size
        scale = width**-0.5
        self.input_resolution = cfg.image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_width or 4 * width, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 3, R, R] -> [B, output_dim]
        x = self.conv1(x)  # [B, W, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [B, grid*grid, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, grid*grid + 1, W]
        x = self.transformer(self.ln_pre(x))
        features: torch.Tensor = self.ln_post(x[:, 0]) @ self.proj  # [B, output_dim]
        return features
