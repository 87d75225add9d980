"""Where each parameter sits in its tower, for full fine-tuning: layer-wise learning-rate decay and frozen towers.

Depth. A tower (the image tower is everything under ``visual.``, the text tower the rest) with ``L`` blocks puts its
embeddings at depth 0 (patch or token embeddings, positions, class token, ``ln_pre``, a ResNet's stem, XLM-RoBERTa's
``embeddings``), block ``i`` (``transformer.resblocks.i``, ``encoder.layer.i``, a ResNet's bottlenecks in order) at
``i + 1``, and everything else (final norms, pooling, projections, ``logit_scale``, ``logit_bias``) at the top,
``L + 1``. With decay ``d``, a parameter at depth ``k`` learns at ``lr * d ** (L + 1 - k)``: the heads at ``lr``,
the embeddings slowest, as BEiT and the CLIP fine-tuning recipes that followed it do.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from .lora import tower_of
from .schedule import NORM_MODULES, is_decayed

logger = logging.getLogger(__name__)

BLOCK_RES = (
    re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\."),  # CLIP and SigLIP towers
    re.compile(r"\.encoder\.layer\.(\d+)\."),  # XLM-RoBERTa
    re.compile(r"^visual\.layer(\d+)\.(\d+)\."),  # ResNet stages and their bottlenecks
)
EMBEDDING_RE = re.compile(
    r"^(visual\.(conv[123]|bn[123]|class_embedding|positional_embedding|ln_pre)|token_embedding|"
    r"positional_embedding|text\.transformer\.embeddings)(\.|$)"
)
MODEL_PREFIX = "model."  # a ContrastiveModule's name for its model


def _block_key(name: str) -> tuple[int, ...] | None:
    for regex in BLOCK_RES:
        match = regex.search(name)
        if match:
            return tuple(int(group) for group in match.groups())
    return None


def layer_depths(names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{name: (depth, top)}`` of parameter names of one model (module docstring); ``top`` is ``L + 1`` of the
    parameter's tower."""
    names = list(names)
    blocks: dict[str | None, set[tuple[int, ...]]] = {}
    for name in names:
        key = _block_key(name)
        if key is not None:
            blocks.setdefault(tower_of(name), set()).add(key)
    order = {tower: {key: i + 1 for i, key in enumerate(sorted(keys))} for tower, keys in blocks.items()}
    depths = {}
    for name in names:
        tower = tower_of(name)
        top = len(order.get(tower, {})) + 1
        key = _block_key(name)
        if key is not None:
            depths[name] = (order[tower][key], top)
        else:
            depths[name] = (0 if EMBEDDING_RE.match(name) else top, top)
    return depths


def layer_decay_groups(module: nn.Module, lr: float, weight_decay: float, decay: float) -> list[dict[str, Any]]:
    """AdamW groups of ``module``'s trainable parameters (a ContrastiveModule, or a model), one per (tower, depth,
    decayed or not): ``{"name", "params", "weight_decay", "lr"}`` with ``lr * decay ** (top - depth)``.

    Weight decay follows :func:`clip_model.train.schedule.param_groups`' rule; groups come in the order of their
    first parameter in ``named_parameters()``.
    """
    named = [(name, param) for name, param in module.named_parameters() if param.requires_grad]
    depths = layer_depths(name.removeprefix(MODEL_PREFIX) for name, _ in named)
    norm_params = frozenset(id(p) for m in module.modules() if isinstance(m, NORM_MODULES) for p in m.parameters())
    groups: dict[str, dict[str, Any]] = {}
    for name, param in named:
        inner = name.removeprefix(MODEL_PREFIX)
        depth, top = depths[inner]
        decayed = is_decayed(inner, param, norm_params)
        key = f"{tower_of(inner) or 'shared'}-{depth}-{'decay' if decayed else 'no_decay'}"
        group = groups.setdefault(
            key,
            {
                "name": key,
                "params": [],
                "weight_decay": weight_decay if decayed else 0.0,
                "lr": lr * decay ** (top - depth),
            },
        )
        group["params"].append(param)
    return list(groups.values())


def freeze_towers(model: nn.Module, towers: Iterable[str]) -> int:
    """Stop gradients to every parameter of the named towers (``"image"``, ``"text"``); returns how many tensors."""
    towers = set(towers)
    frozen = 0
    for name, param in model.named_parameters():
        if tower_of(name) in towers:
            param.requires_grad_(False)
            frozen += 1
    return frozen


def _eval_mode(module: nn.Module, args: Any) -> None:
    module.training = False  # normalize with the running statistics, and leave them as they are


def hold_frozen_batch_norm(model: nn.Module) -> int:
    """Keep every BatchNorm layer whose parameters are all frozen in eval mode during training (a forward pre-hook,
    since training loops call ``model.train()``): it then uses and keeps its running statistics. Returns how many."""
    held = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
            p.requires_grad for p in module.parameters()
        ):
            module.register_forward_pre_hook(_eval_mode)
            held += 1
    if held:
        logger.info("%d frozen BatchNorm layers keep their running statistics", held)
    return held
