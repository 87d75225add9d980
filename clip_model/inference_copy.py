"""The copies of a float32 CPU model that inference modes make by swapping its linear layers (int8 in
:mod:`.quantize`, oneDNN-packed in :mod:`.packed`): checked first, weights shared until swapped, frozen after."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from .model import ImageTextModel
from .transformer import SelfAttention


def check_float32_cpu(model: ImageTextModel, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` (e.g. "int8 quantization") unless ``model`` is float32 on the CPU."""
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise ValueError(f"{what} runs on the CPU only; the model is on {', '.join(sorted(devices))}")
    if model.dtype != torch.float32:
        raise ValueError(f"{what} needs a float32 model, not {model.dtype}")


def swapped_copy(model: ImageTextModel, swap_children: Callable[[nn.Module], None], what: str) -> ImageTextModel:
    """A copy of ``model`` with ``swap_children`` applied to it (under ``no_grad``), in eval mode with
    ``requires_grad`` off; ``model`` is left unchanged.

    The weights of every ``nn.Linear`` and ``SelfAttention`` are shared with ``model`` rather than copied first:
    ``swap_children`` replaces those modules right away. Raises ``ValueError`` as :func:`check_float32_cpu`."""
    check_float32_cpu(model, what)
    memo: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear | SelfAttention):
            memo.update({id(p): p for p in module.parameters(recurse=False)})
    swapped = copy.deepcopy(model, memo)
    with torch.no_grad():
        swap_children(swapped)
    swapped.requires_grad_(False)
    return swapped.eval()
