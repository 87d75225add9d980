"""Optimizer setup for CLIP training: AdamW parameter groups and the warmup + cosine learning-rate schedule.

Contracts:

* Weight decay applies only to matrices and kernels. Gains, biases, embeddings (``token_embedding``,
  ``positional_embedding``, ``class_embedding``), the learned ``logit_scale`` / ``logit_bias`` and every
  LayerNorm/BatchNorm/GroupNorm parameter are in the no-decay group, as in the CLIP paper and OpenCLIP.
* The schedule is stepped once per optimizer step. Before update ``s`` (0-based) the learning rate is
  ``lr * lr_factor(s)``: ``(s + 1) / warmup`` during warmup, then a cosine from ``lr`` down to 0 at ``total_steps``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

NO_DECAY_NAMES = frozenset(
    {"token_embedding", "positional_embedding", "class_embedding", "logit_scale", "logit_bias"}
)  # parameter (or module) names whose tensors are never decayed
NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def is_decayed(name: str, param: torch.Tensor, norm_params: frozenset[int] = frozenset()) -> bool:
    """Whether AdamW should decay ``param`` (named ``name``, e.g. ``"visual.conv1.weight"``); see the module docs."""
    if param.ndim < 2 or id(param) in norm_params:
        return False
    return not NO_DECAY_NAMES.intersection(name.split("."))


def param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups of ``module``'s trainable parameters: ``"decay"`` then ``"no_decay"``.

    Each group is ``{"name", "params", "weight_decay"}``; parameters keep ``named_parameters()`` order, so the
    optimizer's state dict is the same from run to run.
    """
    norm_params = frozenset(id(p) for m in module.modules() if isinstance(m, NORM_MODULES) for p in m.parameters())
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (decay if is_decayed(name, param, norm_params) else no_decay).append(param)
    return [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate before optimizer update ``step`` (0-based); see the module docs."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR applying :func:`lr_factor`; call ``step()`` after each ``optimizer.step()``.

    The factor is a plain closure, so the scheduler's state dict holds only its step count: a resumed run with a
    different ``total_steps`` follows the new schedule from the step it resumes at.
    """
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
