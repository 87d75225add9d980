"""LoRA: low-rank adapters on the linear projections of an image-text model, for parameter-efficient fine-tuning.

A targeted projection ``y = W x + b`` computes ``y = W x + b + (alpha / rank) * B A dropout(x)``, with ``A``
``[rank, in]`` drawn like a linear layer's weight (Kaiming uniform) and ``B`` ``[out, rank]`` zero, so the adapted
model computes exactly the base model until the first update. Every base parameter is frozen; only ``A`` and ``B``
train. :func:`merge_lora` folds each adapter into its base weight (``W + (alpha / rank) * B @ A``) and gives back
the model's own modules, with the state-dict keys :func:`clip_model.save_checkpoint` and :func:`clip_model.load`
use.

Targets. Each projection has a name: an ``nn.Linear``'s module path (``transformer.resblocks.0.mlp.c_fc``), and
for the fused query/key/value projection of a transformer block (:class:`~clip_model.transformer.SelfAttention`,
one ``[3W, W]`` ``in_proj_weight``) one name per slice, ``<attention>.q``, ``.k`` and ``.v``: each slice gets an
adapter of its own on its own rows of the fused weight, and merges into exactly those rows. A target option is a
kind, or a glob (:func:`fnmatch.fnmatchcase`) over those names (``visual.*``, ``*.resblocks.1[01].*``). The kinds
(:data:`KINDS`), in every family :func:`clip_model.load` builds:

- ``q``, ``k``, ``v``: attention query, key, value (the fused slices; XLM-RoBERTa's ``attention.self.query`` ...;
  the ResNet image tower's attention pool ``attnpool.q_proj`` ...);
- ``out``: attention output (``attn.out_proj``; ``attention.output.dense``; ``attnpool.c_proj``);
- ``fc``, ``proj``: the MLP's two layers (``mlp.c_fc`` / ``mlp.c_proj``, SigLIP's pooling MLP included;
  ``intermediate.dense`` / a layer's ``output.dense``).

The SigLIP attention pool's fused projection (its probe's query and the tokens' keys and values) is not a target.
The image tower is everything under ``visual.``; the text tower the rest but ``logit_scale`` and ``logit_bias``.

Adapter files (:func:`save_adapter`) are safetensors holding ``<target>.lora_A`` / ``<target>.lora_B`` and, as
metadata, the rank, alpha, dropout, the target names and the fingerprint of the base weights they were trained on;
:func:`load_adapter` refuses a file trained on other weights. Nothing in them is executed.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import weights_sha256
from ..errors import CheckpointError
from ..transformer import ProjectedSelfAttention, SelfAttention

logger = logging.getLogger(__name__)

KINDS = ("q", "k", "v", "out", "fc", "proj")
KIND_PATTERNS: dict[str, tuple[str, ...]] = {  # regexes over target names, anchored at a dot or the start
    "q": (r"attn\.q", r"attention\.self\.query", r"attnpool\.q_proj"),
    "k": (r"attn\.k", r"attention\.self\.key", r"attnpool\.k_proj"),
    "v": (r"attn\.v", r"attention\.self\.value", r"attnpool\.v_proj"),
    "out": (r"attn\.out_proj", r"attention\.output\.dense", r"attnpool\.c_proj"),
    "fc": (r"mlp\.c_fc", r"intermediate\.dense"),
    "proj": (r"mlp\.c_proj", r"layer\.\d+\.output\.dense"),
}
_KIND_RES = {kind: re.compile(rf"(^|\.)({'|'.join(res)})$") for kind, res in KIND_PATTERNS.items()}
QKV = ("q", "k", "v")  # the slices of a fused in_proj_weight, in row order
TOWERS = ("image", "text")
IMAGE_PREFIX = "visual."
SHARED_PARAMETERS = frozenset({"logit_scale", "logit_bias"})  # in neither tower
ADAPTER_FORMAT = 1
ADAPTER_METADATA_KEY = "clip_model_lora"
SHOWN_NAMES = 3  # target names quoted in an error message

ModuleT = TypeVar("ModuleT", bound=nn.Module)


@dataclass(frozen=True)
class LoRAConfig:
    """What to adapt and how: ``rank`` and ``alpha`` (the update is scaled by ``alpha / rank``), the ``dropout``
    on each adapter's input while training, the ``targets`` (kinds or globs, see the module docstring) and the
    ``towers`` they are looked for in."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = KINDS
    towers: tuple[str, ...] = TOWERS

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"rank (--lora-rank) must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            problems.append(f"alpha (--lora-alpha) must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout (--lora-dropout) must be in [0, 1), got {self.dropout}")
        if not self.targets:
            problems.append(f"targets (--lora-targets) must name at least one kind ({', '.join(KINDS)}) or pattern")
        if not self.towers or set(self.towers) - set(TOWERS):
            problems.append(f"towers must be a non-empty subset of {TOWERS}, got {self.towers}")
        if problems:
            raise ValueError("invalid LoRA options: " + "; ".join(problems))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def tower_of(name: str) -> str | None:
    """``"image"`` for a parameter or target name under ``visual.``, None for ``logit_scale``/``logit_bias``, else
    ``"text"``."""
    if name.startswith(IMAGE_PREFIX):
        return "image"
    return None if name in SHARED_PARAMETERS else "text"


def kind_of(name: str) -> str | None:
    """The kind (:data:`KINDS`) of a target name; None for a linear layer of no kind (a pattern may still pick it)."""
    return next((kind for kind, regex in _KIND_RES.items() if regex.search(name)), None)


class LoRAAdapter(nn.Module):
    """The low-rank update of one projection: ``x [..., in] -> scale * x A^T B^T [..., out]``."""

    def __init__(self, like: torch.Tensor, rank: int, scale: float, generator: torch.Generator | None = None) -> None:
        """An adapter for a weight ``like`` ``[out, in]``, on its device and in its dtype; ``A`` drawn from
        ``generator`` (default: torch's global one)."""
        super().__init__()
        out_features, in_features = like.shape
        self.scale = scale
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=like.device, dtype=like.dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=like.device, dtype=like.dtype))
        drawn = torch.empty(rank, in_features)  # on the CPU, so a CPU generator serves every device
        nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)  # nn.Linear's own init
        with torch.no_grad():
            self.lora_A.copy_(drawn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        update: torch.Tensor = F.linear(F.linear(x, self.lora_A), self.lora_B)  # [..., out]
        return update * self.scale

    def delta(self) -> torch.Tensor:
        """``scale * B @ A`` ``[out, in]``, computed in float64 so that a merge adds it with one rounding."""
        return self.scale * (self.lora_B.detach().double() @ self.lora_A.detach().double())


class LoRALinear(nn.Module):
    """An ``nn.Linear`` plus a :class:`LoRAAdapter`: ``weight``/``bias`` are the base layer's (frozen) parameters."""

    def __init__(self, base: nn.Linear, config: LoRAConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.dropout = nn.Dropout(config.dropout)
        self.adapter = LoRAAdapter(base.weight, config.rank, config.scale, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        update: torch.Tensor = self.adapter(self.dropout(x))
        return F.linear(x, self.weight, self.bias) + update

    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight (its own parameters, changed in place)."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        _add_delta(self.weight, self.adapter.delta())
        linear.weight = self.weight
        linear.bias = self.bias
        return linear


class LoRAQKV(nn.Module):
    """The fused q/k/v projection of :class:`~clip_model.transformer.SelfAttention` (``[..., W] -> [..., 3W]``,
    q, k, v stacked), with an adapter on each targeted slice; ``weight``/``bias`` are the base (frozen) ones."""

    def __init__(
        self,
        attention: SelfAttention,
        slices: Iterable[str],
        config: LoRAConfig,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.weight = attention.in_proj_weight  # [3W, W]
        self.bias = attention.in_proj_bias  # [3W]
        self.width = self.weight.shape[1]
        self.dropout = nn.Dropout(config.dropout)
        self.adapters = nn.ModuleDict(
            {name: LoRAAdapter(self.weight[: self.width], config.rank, config.scale, generator) for name in slices}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., W] -> [..., 3W]
        qkv = F.linear(x, self.weight, self.bias)  # [..., 3W]
        h = self.dropout(x)
        parts = [qkv[..., i * self.width : (i + 1) * self.width] for i in range(len(QKV))]  # q, k, v: [..., W]
        for i, name in enumerate(QKV):
            if name in self.adapters:
                parts[i] = parts[i] + self.adapters[name](h)
        return torch.cat(parts, dim=-1)

    def slices(self) -> dict[str, LoRAAdapter]:
        """The adapters by slice name (``"q"``, ``"k"``, ``"v"``)."""
        return {name: adapter for name, adapter in self.adapters.items() if isinstance(adapter, LoRAAdapter)}

    def merge_into_weight(self) -> None:
        """Fold each slice's update into its rows of the fused weight (in place)."""
        for name, adapter in self.slices().items():
            i = QKV.index(name)
            _add_delta(self.weight[i * self.width : (i + 1) * self.width], adapter.delta())


def _add_delta(weight: torch.Tensor, delta: torch.Tensor) -> None:
    with torch.no_grad():
        weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))


@dataclass(frozen=True)
class _Projection:
    """One target candidate: its name, its shape, and where it lives."""

    name: str
    in_features: int
    out_features: int
    module: str  # path of the nn.Linear, or of the SelfAttention holding the fused slice
    slice: str | None = None  # "q", "k" or "v" for a fused slice


def projections(model: nn.Module) -> list[_Projection]:
    """Every projection LoRA can target in ``model`` (not yet adapted), in module order (see the module docstring)."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, SelfAttention):
            width = module.in_proj_weight.shape[1]
            found += [_Projection(f"{path}.{s}", width, width, path, s) for s in QKV]
        elif isinstance(module, nn.Linear):
            found.append(_Projection(path, module.in_features, module.out_features, path))
    return found


def select_targets(model: nn.Module, config: LoRAConfig) -> list[_Projection]:
    """The projections ``config`` targets in ``model``, checked: ValueError for a pattern that matches none of them
    (a kind may be missing from a tower, as the MLP from a ResNet's, as long as the kinds find some), and for a
    rank above a targeted layer's smaller dimension."""
    candidates = [p for p in projections(model) if tower_of(p.name) in config.towers]
    examples = ", ".join(p.name for p in candidates[:SHOWN_NAMES]) or "none"
    where = f"in the {' and '.join(config.towers)} tower(s)"
    chosen: dict[str, _Projection] = {}
    for spec in config.targets:
        matched = [p for p in candidates if (kind_of(p.name) == spec if spec in KINDS else _glob(p.name, spec))]
        if not matched and spec not in KINDS:
            raise ValueError(
                f"LoRA target (--lora-targets) {spec!r} matches no projection of this model {where}: give a kind "
                f"({', '.join(KINDS)}) or a glob over projection names such as {examples}"
            )
        chosen.update((p.name, p) for p in matched)
    if not chosen:
        raise ValueError(f"LoRA targets (--lora-targets) {', '.join(config.targets)} match no projection {where}")
    targets = [p for p in candidates if p.name in chosen]
    too_small = [p for p in targets if config.rank > min(p.in_features, p.out_features)]
    if too_small:
        first = too_small[0]
        raise ValueError(
            f"LoRA rank (--lora-rank) {config.rank} is larger than {len(too_small)} targeted layer(s), e.g. "
            f"{first.name} ({first.in_features} -> {first.out_features}): use a rank of at most "
            f"{min(min(p.in_features, p.out_features) for p in targets)}"
        )
    return targets


def _glob(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern)


def apply_lora(model: nn.Module, config: LoRAConfig, seed: int = 0) -> list[str]:
    """Freeze every parameter of ``model`` and put adapters on the targeted projections, in place.

    The ``A`` matrices are drawn from a generator seeded with ``seed``, so the same call gives the same adapters in
    every process. Returns the target names, in module order. Raises ValueError (before changing anything) as
    :func:`select_targets` does, and for a model that already has adapters.
    """
    if any(isinstance(m, LoRALinear | LoRAQKV) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters: merge them (merge_lora) before adding others")
    targets = select_targets(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    fused: dict[str, list[str]] = {}
    for target in targets:
        if target.slice is not None:
            fused.setdefault(target.module, []).append(target.slice)
        else:
            _replace(model, target.module, LoRALinear(_linear(model, target.module), config, generator))
    for path, slices in fused.items():
        attention = model.get_submodule(path)
        assert isinstance(attention, SelfAttention)  # projections() found it as one
        qkv = LoRAQKV(attention, slices, config, generator)
        _replace(model, path, ProjectedSelfAttention(attention.heads, qkv, attention.out_proj))
    names = [t.name for t in targets]
    trainable, total = parameter_counts(model)
    logger.info(
        "LoRA rank %d, alpha %g on %d projections (%s): %d of %d parameters trainable (%.2f%%)",
        config.rank,
        config.alpha,
        len(names),
        describe(names),
        trainable,
        total,
        100 * trainable / total,
    )
    return names


def _linear(model: nn.Module, path: str) -> nn.Linear:
    module = model.get_submodule(path)
    assert isinstance(module, nn.Linear)  # projections() found it as one
    return module


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path``, in the training mode of the module it replaces."""
    module.train(model.get_submodule(path).training)
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model`` (shared tensors counted once)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def adapted_modules(model: nn.Module) -> dict[str, LoRAAdapter]:
    """Each adapter of ``model`` under its target name (see the module docstring)."""
    found = {}
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            found[path] = module.adapter
        elif isinstance(module, ProjectedSelfAttention) and isinstance(module.in_proj, LoRAQKV):
            found.update((f"{path}.{name}", adapter) for name, adapter in module.in_proj.slices().items())
    return found


def merge_lora(model: ModuleT) -> ModuleT:
    """Fold every adapter into its base weight and put the model's own modules back, in place; returns ``model``.

    Afterwards ``model``'s state-dict keys are those of the model before :func:`apply_lora` (so it saves and loads
    like any other) and, in eval mode, it computes what the adapted model computed, to float32 rounding. Its
    parameters stay frozen.
    """
    for path, module in list(model.named_modules()):
        if isinstance(module, ProjectedSelfAttention) and isinstance(module.in_proj, LoRAQKV):
            module.in_proj.merge_into_weight()
            width = module.in_proj.width
            with torch.device("meta"):
                attention = SelfAttention(width, module.heads)
            attention.in_proj_weight = module.in_proj.weight
            attention.in_proj_bias = module.in_proj.bias
            attention.out_proj = module.out_proj  # type: ignore[assignment]  # a LoRALinear until merged below
            _replace(model, path, attention)
    for path, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _replace(model, path, module.merged())
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<target>.lora_A": [rank, in], "<target>.lora_B": [out, rank]}``, float32 on CPU, targets sorted."""
    state = {}
    for name, adapter in sorted(adapted_modules(model).items()):
        state[f"{name}.lora_A"] = adapter.lora_A.detach().float().cpu().contiguous()
        state[f"{name}.lora_B"] = adapter.lora_B.detach().float().cpu().contiguous()
    return state


@dataclass(frozen=True)
class AdapterFile:
    """What an adapter file holds: its options, its target names, the base weights' fingerprint, extra metadata."""

    config: LoRAConfig
    targets: tuple[str, ...]
    base_weights_sha256: str
    tensors: dict[str, torch.Tensor] = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict)


def save_adapter(
    model: nn.Module, config: LoRAConfig, base_weights_sha256: str, path: Path, extra: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model``'s adapters as ``path`` (``.safetensors``), atomically; ``extra``: JSON-able metadata kept
    beside the options (the fine-tuning run's provenance)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"adapters are written as safetensors; name the file *.safetensors, not {path.name}")
    state = adapter_state_dict(model)
    if not state:
        raise ValueError("the model has no LoRA adapters to save")
    targets = sorted(name.removesuffix(".lora_A") for name in state if name.endswith(".lora_A"))
    record = {
        "format": ADAPTER_FORMAT,
        "config": asdict(config),
        "targets": targets,
        "base_weights_sha256": base_weights_sha256,
        "extra": dict(extra or {}),
    }
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        save_file(state, str(partial), metadata={ADAPTER_METADATA_KEY: json.dumps(record, sort_keys=True)})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_adapter(path: Path) -> AdapterFile:
    """Read an adapter file written by :func:`save_adapter` (never runs code from it); CheckpointError otherwise."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
        record = json.loads(metadata[ADAPTER_METADATA_KEY])
        if record.get("format") != ADAPTER_FORMAT:
            raise ValueError(f"format {record.get('format')!r}, not {ADAPTER_FORMAT}")
        options = record["config"]
        config = LoRAConfig(
            int(options["rank"]),
            float(options["alpha"]),
            float(options["dropout"]),
            tuple(options["targets"]),
            tuple(options["towers"]),
        )
        return AdapterFile(
            config, tuple(record["targets"]), str(record["base_weights_sha256"]), tensors, dict(record["extra"])
        )
    except Exception as exc:  # safetensors' own errors, a missing key, bad JSON or options
        raise CheckpointError(f"{path} is not a LoRA adapter file of this project: {exc!r}") from exc


def load_adapter(model: nn.Module, path: Path) -> list[str]:
    """Put the adapters of ``path`` on ``model`` (its base weights, not adapted yet), in place: as
    :func:`apply_lora` with the file's options and targets, then the file's tensors. Returns the target names.

    Raises CheckpointError for a file trained on other base weights or whose tensors do not fit the model.
    """
    adapter = read_adapter(path)
    actual = weights_sha256(model)
    if actual != adapter.base_weights_sha256:
        raise CheckpointError(
            f"{path} was trained on base weights with sha256 {adapter.base_weights_sha256[:12]}..., not on this "
            f"model's ({actual[:12]}...): load the base model it was made for"
        )
    config = LoRAConfig(adapter.config.rank, adapter.config.alpha, adapter.config.dropout, adapter.targets, TOWERS)
    targets = apply_lora(model, config)
    adapters = adapted_modules(model)
    expected = {f"{name}.lora_{part}" for name in targets for part in "AB"}
    if expected != set(adapter.tensors):
        missing, unexpected = sorted(expected - set(adapter.tensors)), sorted(set(adapter.tensors) - expected)
        raise CheckpointError(f"{path} does not fit the model: missing {missing[:SHOWN_NAMES]}, "
                              f"unexpected {unexpected[:SHOWN_NAMES]}")  # fmt: skip
    with torch.no_grad():
        for name in targets:
            for part in "AB":
                param = getattr(adapters[name], f"lora_{part}")
                value = adapter.tensors[f"{name}.lora_{part}"]
                if value.shape != param.shape:
                    raise CheckpointError(f"{path}: {name}.lora_{part} has shape {tuple(value.shape)}, the model "
                                          f"needs {tuple(param.shape)}")  # fmt: skip
                param.copy_(value)
    return targets


def describe(targets: Sequence[str]) -> str:
    """A short account of target names for logs: how many of each kind, per tower."""
    counts: dict[str, int] = {}
    for name in targets:
        key = f"{tower_of(name)} {kind_of(name) or name.rsplit('.', 1)[-1]}"
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{key} x{count}" for key, count in sorted(counts.items()))
