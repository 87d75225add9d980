"""ModifiedResNet image tower of OpenAI's RN50..RN50x64 models.

Differences from a torchvision ResNet: a 3-conv stem with an average pool, anti-aliased downsampling (an average
pool before stride-1 convs wherever a stride-2 conv would be), and attention pooling instead of global average
pooling. Parameter names match OpenAI's ``visual.*`` keys (``downsample.0`` is the conv, ``downsample.1`` the BN).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig

EXPANSION = 4  # a bottleneck's output has 4x the channels of its inner convs
DOWNSAMPLE_FACTOR = 32  # total spatial reduction of stem (x4) and layers 2-4 (x8)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avgpool if strided) -> 1x1 convs with BN/ReLU, plus an (avgpool, 1x1 conv, BN) shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        outplanes = planes * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, outplanes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(outplanes)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != outplanes:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, outplanes, 1, bias=False)),
                        ("1", nn.BatchNorm2d(outplanes)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, inplanes, H, W] -> [B, 4*planes, H/s, W/s]
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        activated: torch.Tensor = self.relu3(out + shortcut)
        return activated


class AttentionPool2d(nn.Module):
    """Pools a feature map with one attention query: the mean of all positions, attending over mean + positions."""

    def __init__(self, grid: int, width: int, heads: int, output_dim: int) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, h, w] -> [B, output_dim]
        B, C = x.shape[:2]  # batch, channels (= width)
        x = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, L, C]
        L, D = x.shape[1], C // self.heads  # tokens, head width
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, D).transpose(1, 2)  # [B, H, 1, D]
        k = self.k_proj(x).view(B, L, self.heads, D).transpose(1, 2)  # [B, H, L, D]
        v = self.v_proj(x).view(B, L, self.heads, D).transpose(1, 2)  # [B, H, L, D]
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, 1, D]
        pooled: torch.Tensor = self.c_proj(out.transpose(1, 2).reshape(B, C))
        return pooled


class ModifiedResNet(nn.Module):
    """``[B, 3, R, R]`` images -> ``[B, output_dim]`` features (not normalized)."""

    # registered by ``setattr`` in ``__init__``, one per entry of ``cfg.layers``
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, cfg: VisionConfig, output_dim: int) -> None:
        super().__init__()
        assert isinstance(cfg.layers, tuple)  # guaranteed by the caller's is_resnet dispatch
        width = cfg.width
        self.input_resolution = cfg.image_size
        self.conv1 = nn.Conv2d(3, width // 2, kernel_size=3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, kernel_size=3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes = width
        for i, blocks in enumerate(cfg.layers):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            layer = [Bottleneck(inplanes, planes, stride)]
            layer += [Bottleneck(planes * EXPANSION, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
            inplanes = planes * EXPANSION
        grid = cfg.image_size // DOWNSAMPLE_FACTOR
        self.attnpool = AttentionPool2d(grid, inplanes, cfg.heads, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, 3, R, R] -> [B, output_dim]
        x = self.relu1(self.bn1(self.conv1(x)))  # [B, width/2, R/2, R/2]
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))  # [B, width, R/4, R/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, 32*width, R/32, R/32]
        pooled: torch.Tensor = self.attnpool(x)
        return pooled
