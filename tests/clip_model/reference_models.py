"""Random-weight reference models (OpenAI's code) and inputs for parity tests.

Fresh CLIP init leaves whole branches inert (zero biases, ``bn3`` weights at zero so every ResNet block is the
identity), so a parity test on it could not notice a broken branch. :func:`scramble_` gives every tensor
non-trivial values at scales that keep activations finite through the deepest towers.
"""

from __future__ import annotations

import torch
from torch import nn

from clip_model.config import CLIPConfig
from tests.reference import load_reference

EOT_TOKEN = 49407
SOT_TOKEN = 49406


def reference_clip(cfg: CLIPConfig, seed: int = 0, gelu: bool = False) -> nn.Module:
    """OpenAI's ``CLIP`` with ``cfg``'s sizes, scrambled weights, eval mode; ``gelu`` swaps in exact GELU."""
    ref = load_reference("model")
    v, t = cfg.vision, cfg.text
    torch.manual_seed(seed)
    model = ref.CLIP(
        cfg.embed_dim,
        v.image_size,
        v.layers,
        v.width,
        v.patch_size,
        t.context_length,
        t.vocab_size,
        t.width,
        t.heads,
        t.layers,
    )
    if gelu:
        for module in model.modules():
            if isinstance(module, nn.Sequential) and hasattr(module, "gelu"):
                module.gelu = nn.GELU()
    scramble_(model, seed)
    return model.eval()


def scramble_(model: nn.Module, seed: int) -> None:
    """Give biases, norms and BN statistics random values so that every parameter affects the output."""
    gen = torch.Generator().manual_seed(seed + 1)

    def rand(t: torch.Tensor, scale: float, shift: float = 0.0) -> torch.Tensor:
        return shift + scale * torch.randn(t.shape, generator=gen)

    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point() or t.dim() != 1:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif leaf == "running_mean":
                t.copy_(rand(t, 0.1))
            elif name.endswith("bn3.weight") and ".layer" in name:
                t.copy_(rand(t, 0.05, 0.2))  # residual branches on, but small: 64 blocks must stay finite
            elif leaf == "weight":
                t.copy_(rand(t, 0.1, 1.0))
            elif leaf in ("bias", "in_proj_bias"):
                t.copy_(rand(t, 0.05))
            else:  # class_embedding and other 1-D parameters
                t.copy_(rand(t, t.std().item() or 0.02))


def random_images(cfg: CLIPConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)


def random_tokens(batch: int = 3, context_length: int = 77, seed: int = 0) -> torch.Tensor:
    """Rows shaped like tokenizer output: start token, random ids, end token, zero padding; varied lengths."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.zeros(batch, context_length, dtype=torch.long)
    for i in range(batch):
        n = 1 + (i * 37 + 5) % (context_length - 2)  # lengths 6, 43, 3, ...: short and long prompts
        rows[i, 0] = SOT_TOKEN
        rows[i, 1 : n + 1] = torch.randint(1, SOT_TOKEN, (n,), generator=gen)
        rows[i, n + 1] = EOT_TOKEN
    return rows
