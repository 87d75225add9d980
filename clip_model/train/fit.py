"""``clip-train fit``: train CLIP from scratch or fine-tune it on image-caption pairs, alone or under ``torchrun``.

The training loop is this module's alone: ``clip-train finetune`` (:mod:`.finetune`) hands :func:`fit` a model it
prepared (a :class:`ModelSetup`: adapters, frozen towers, per-layer learning rates) and shares everything below.

Contracts:

* The data order depends only on ``(seed, step)``: epoch ``e`` is a permutation of the training pairs drawn from a
  generator seeded with ``seed + e``, cut into ``len(pairs) // batch_size`` global batches (the remainder of each
  epoch is dropped). Under ``torchrun`` (``WORLD_SIZE > 1``) rank ``r`` of ``W`` takes the ``r``-th contiguous
  slice of ``batch_size / W`` pairs of each global batch, so ``W`` processes see exactly the one-process batches.
* The loss is the global-batch loss: :mod:`clip_model.loss` gathers every rank's features, and its gradients summed
  over ranks are the one-process gradients. DistributedDataParallel averages, so each rank backpropagates
  ``world_size * loss``. Apart from floating-point rounding, ``W`` processes therefore train the same model as one
  process with the same global batch.
* Resuming from a training checkpoint (:mod:`clip_model.train.state`) continues the run exactly: model, optimizer,
  scheduler, loss scaler, step and RNG states are restored, and the data order is a function of the step.
* Text batches are cut to their longest caption (end-of-text position + 1) before encoding. The causal mask makes
  each end-of-text feature independent of the padding after it, so this only saves time.
* A training set whose uint8 pixels fit in ``preload_mb`` MiB is decoded once, before the first step, and served
  from memory (:class:`~clip_model.train.data.PreloadedPairDataset`, bit-identical items, no loader processes);
  a larger one is decoded per step by ``num_workers`` processes. Either way the run is the same.
* Only rank 0 writes files and logs progress. Output layout of ``out_dir``::

      model.safetensors        final CLIP weights + architecture (clip_model.load reads it); no SigLIP logit_bias
      metrics.jsonl            one JSON object per logged step: step, loss, lr, logit_scale, samples_per_s, eval
      options.json             the FitOptions of the latest run
      checkpoints/step-*.pt    the last training checkpoints (--resume continues from the newest)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..checkpoint import save_checkpoint
from ..config import CLIPConfig, list_configs
from ..errors import ClipModelError, UnknownModelError
from ..factory import create_model, load, tokenizer_for, trim_for
from ..loss import MAX_LOGIT_SCALE, clip_loss, siglip_loss
from ..model import CLIP, ImageTextModel
from ..preprocess import Preprocess
from ..siglip import SigLIP
from .data import (
    DatasetError,
    Pair,
    PairDataset,
    PreloadedPairDataset,
    TextTokenizer,
    preloaded_bytes,
    read_pairs,
)
from .evaluate import encode_dataset, retrieval_metrics, zero_shot_accuracy
from .schedule import param_groups, warmup_cosine
from .state import TrainingState, capture_rng, latest_state, load_state, restore_rng, save_state

logger = logging.getLogger(__name__)

Loss = Literal["clip", "siglip"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
LOSSES: tuple[Loss, ...] = ("clip", "siglip")
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "bf16", "fp16")

ADAM_BETAS = (0.9, 0.98)  # the CLIP paper's AdamW betas and epsilon
ADAM_EPS = 1e-6
MAX_LOG_LOGIT_SCALE = math.log(MAX_LOGIT_SCALE)  # logit_scale is clamped to [0, log 100] after each step
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # SigLIP's initial temperature and bias (from scratch)
SIGLIP_INIT_LOGIT_BIAS = -10.0
RECALL_KS = (1, 5, 10)
ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)  # one template keeps evaluation cheap
ZERO_SHOT_METRIC = "zero_shot_accuracy_photo"  # the name clip-train eval gives this template's accuracy
EVAL_BATCH_SIZE = 128  # images or captions encoded per forward pass during evaluation
MIB = 1 << 20
SPLIT_SEED = 0  # the held-out split does not change with --seed
MODEL_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
OPTIONS_FILE = "options.json"
CHECKPOINT_DIR = "checkpoints"
RESUME_IGNORED_OPTIONS = frozenset(
    {"resume", "stop_after", "num_workers", "preload_mb", "log_every", "eval_every", "save_every"}
)


class FitError(ClipModelError, ValueError):
    """Training options that cannot work together, or a run that cannot continue (the message says which)."""


@dataclass(frozen=True)
class FitOptions:
    """One training run. Paths may be relative to the working directory; ``clip-train fit --help`` explains each."""

    data: Path  # training folder: captions.jsonl/.csv (path, caption[, label]) or same-named .txt captions
    model: str  # architecture name or JSON architecture file (from scratch), or checkpoint / pretrained name
    out_dir: Path
    captions: Path | None = None  # captions file for ``data`` when it is not captions.jsonl/.csv in the folder
    val_data: Path | None = None  # held-out folder; default: hold out ``val_fraction`` of ``data``
    val_fraction: float = 0.1  # 0 and no ``val_data``: no evaluation
    steps: int = 1000  # optimizer steps of the whole run (the schedule's length)
    batch_size: int = 64  # GLOBAL batch: split evenly over the processes
    lr: float = 5e-4  # peak learning rate; ~1e-5 suits fine-tuning pretrained weights
    weight_decay: float = 0.2
    warmup_steps: int = 100
    eval_every: int = 100  # 0: evaluate only at the end
    save_every: int = 500  # training checkpoint every N steps (and always at the end); 0: only at the end
    log_every: int = 10
    loss: Loss = "clip"
    precision: Precision = "auto"  # auto: bf16 autocast on CUDA with bf16, else fp16 + loss scaling; fp32 on CPU
    grad_checkpointing: bool = False
    seed: int = 0
    num_workers: int = 2  # DataLoader worker processes per training process (none when the images are preloaded)
    preload_mb: int = 1024  # decode the training images once into memory when they fit in this many MiB; 0: never
    resume: bool = False  # continue from the newest checkpoint in out_dir/checkpoints
    stop_after: int | None = None  # end this invocation after this step (checkpoint saved) without changing the plan
    device: str | None = None  # default: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu

    def to_json(self) -> str:
        """The options as a JSON object (paths as strings), keys sorted."""
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}
        return json.dumps(fields, sort_keys=True)


@dataclass(frozen=True)
class FitResult:
    """What a finished :func:`fit` call produced. ``metrics`` is the last logged record (eval included on rank 0)."""

    step: int
    metrics: dict[str, Any]
    out_dir: Path
    model_path: Path
    metrics_path: Path
    checkpoint_path: Path | None


ParamGroups = Callable[[nn.Module], list[dict[str, Any]]]  # ContrastiveModule -> AdamW parameter groups
SaveModel = Callable[[ImageTextModel, Path], None]  # (trained model, out_dir / MODEL_FILE) -> writes the outputs


@dataclass(frozen=True)
class ModelSetup:
    """A model its caller prepared for :func:`fit` (``clip-train finetune``): weights loaded, adapters in place,
    some parameters frozen. It replaces what ``options.model`` would build; a resumed run restores its checkpoint
    into it, so it must be built the same way each time.

    ``param_groups`` gives the optimizer's groups of the :class:`ContrastiveModule` around ``model`` (each may set
    its own ``lr``, which the schedule then scales); ``save`` writes the final model instead of
    :func:`~clip_model.save_checkpoint` (an adapted model merges its adapters first).
    """

    model: ImageTextModel
    preprocess: Preprocess
    param_groups: ParamGroups
    save: SaveModel


@dataclass(frozen=True)
class _World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def fit(options: FitOptions, setup: ModelSetup | None = None) -> FitResult:
    """Train as ``options`` say and write ``options.out_dir`` (see the module docstring for the layout).

    ``setup``: the model to train, prepared by the caller (:class:`ModelSetup`); default: the one ``options.model``
    names (an architecture to train from scratch, or a CLIP checkpoint to fine-tune every weight of).

    Under ``torchrun`` every process calls this with the same options; the process group (nccl on CUDA, gloo on
    CPU) is created here and destroyed before returning, unless the caller already created one.

    Raises:
        FitError: inconsistent options, ``--resume`` without a checkpoint, an out_dir holding another run, divergence.
        DatasetError: a missing or unreadable dataset. UnknownModelError: ``model`` names nothing known.
    """
    check_options(options)
    env = os.environ
    world = _World(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
    device = _device(options.device, world)
    owns_group = world.size > 1 and not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return _fit(options, world, device, setup)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def check_options(o: FitOptions) -> None:
    """FitError naming every option out of its range (the checks of :func:`fit`, also for callers that do work
    before it)."""
    problems = [f"{k} must be >= 1, got {v}" for k, v in _fields(o, "steps", "batch_size", "log_every") if v < 1]
    problems += [
        f"{k} must be >= 0, got {v}"
        for k, v in _fields(o, "warmup_steps", "eval_every", "save_every", "num_workers", "preload_mb", "weight_decay")
        if v < 0
    ]
    if not o.lr > 0:
        problems.append(f"lr must be > 0, got {o.lr}")
    if not 0 <= o.val_fraction < 1:
        problems.append(f"val_fraction must be in [0, 1), got {o.val_fraction}")
    if o.loss not in LOSSES:
        problems.append(f"loss must be one of {', '.join(LOSSES)}, got {o.loss!r}")
    if o.precision not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {o.precision!r}")
    processes = int(os.environ.get("WORLD_SIZE", 1))
    if o.batch_size % processes:
        problems.append(f"batch size {o.batch_size} is not divisible by the {processes} processes")
    if o.stop_after is not None and not 1 <= o.stop_after <= o.steps:
        problems.append(f"stop_after must be between 1 and steps ({o.steps}), got {o.stop_after}")
    if problems:
        raise FitError("invalid training options: " + "; ".join(problems))


def _fields(options: FitOptions, *names: str) -> list[tuple[str, Any]]:
    return [(name, getattr(options, name)) for name in names]


def _device(requested: str | None, world: _World) -> torch.device:
    if requested is not None:
        device = torch.device(requested)
    elif torch.cuda.is_available():
        device = torch.device("cuda", world.local_rank if world.size > 1 else 0)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _fit(options: FitOptions, world: _World, device: torch.device, setup: ModelSetup | None) -> FitResult:
    out = Path(options.out_dir)
    state = _resume_state(options, out)
    random.seed(options.seed)
    torch.manual_seed(options.seed)
    train_pairs, val_pairs = read_data(options)
    if setup is None:
        built, built_preprocess = _build_model(options, state)
        setup = ModelSetup(built, built_preprocess, lambda module: param_groups(module, options.weight_decay), _save)
    model, preprocess = setup.model, setup.preprocess
    trainer = _Trainer.create(options, world, device, setup, state)
    evaluator = _Evaluator(val_pairs, preprocess) if val_pairs else None
    stop = options.stop_after or options.steps
    if world.is_main:
        _prepare_out_dir(out, options, trainer.step)
    sampler = StepBatchSampler(len(train_pairs), options.batch_size, options.seed, trainer.step, stop, world)
    dataset = _training_dataset(train_pairs, preprocess, model, options.preload_mb)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=0 if isinstance(dataset, PreloadedPairDataset) else options.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(options.seed),  # leaves the global RNG untouched
    )
    record = _train(trainer, loader, stop, evaluator, out)
    model_path = out / MODEL_FILE
    if world.is_main:
        setup.save(trainer.module.model, model_path)
        logger.info("step %d: saved %s", trainer.step, model_path)
    if world.size > 1:
        dist.barrier()  # every rank returns once rank 0's files exist
    checkpoint = latest_state(out / CHECKPOINT_DIR)
    return FitResult(trainer.step, record, out, model_path, out / METRICS_FILE, checkpoint)


def _save(model: ImageTextModel, path: Path) -> None:
    save_checkpoint(model, path)


def _training_dataset(
    pairs: Sequence[Pair], preprocess: Preprocess, model: ImageTextModel, preload_mb: int
) -> PairDataset | PreloadedPairDataset:
    """The pairs preloaded into memory when their pixels fit in ``preload_mb`` MiB, else decoded per step; captions
    tokenized by ``model``'s tokenizer."""
    tokenizer: TextTokenizer = tokenizer_for(model)
    needed = preloaded_bytes(pairs, preprocess.image_size)
    if needed > preload_mb * MIB:
        logger.info("decoding images per step: %.0f MiB of pixels exceed --preload-mb %d", needed / MIB, preload_mb)
        return PairDataset(pairs, preprocess, model.context_length, tokenizer)
    started = time.perf_counter()
    dataset = PreloadedPairDataset(pairs, preprocess, model.context_length, tokenizer)
    logger.info("preloaded %d images (%.0f MiB) in %.1f s", len(pairs), needed / MIB, time.perf_counter() - started)
    return dataset


def _resume_state(options: FitOptions, out: Path) -> TrainingState | None:
    """The checkpoint to continue from (``resume``), after checking out_dir holds no other run (not ``resume``)."""
    newest = latest_state(out / CHECKPOINT_DIR)
    if not options.resume:
        if newest is not None:
            raise FitError(
                f"{out} already holds training checkpoints ({newest.name}); pass --resume to continue that run "
                "or choose another --out"
            )
        return None
    if newest is None:
        raise FitError(f"--resume: no training checkpoint in {out / CHECKPOINT_DIR}")
    state = load_state(newest)
    _check_resumed_options(json.loads(state.options), options)
    logger.info("resuming from %s (step %d)", newest, state.step)
    return state


def _check_resumed_options(saved: dict[str, Any], options: FitOptions) -> None:
    current = json.loads(options.to_json())
    changed = sorted(k for k in current if k not in RESUME_IGNORED_OPTIONS and saved.get(k) != current[k])
    if "loss" in changed:
        raise FitError(f"cannot resume a {saved.get('loss')!r}-loss run with loss {options.loss!r}")
    if changed:
        logger.warning(
            "resuming with changed options (the run will not match an uninterrupted one): %s",
            ", ".join(f"{k} {saved.get(k)!r} -> {current[k]!r}" for k in changed),
        )


def read_data(options: FitOptions) -> tuple[list[Pair], list[Pair]]:
    """``(train, held out)`` pairs of ``options``' data (:func:`split_pairs`, or ``val_data``); DatasetError when
    there are fewer training pairs than the batch size."""
    pairs = read_pairs(Path(options.data), options.captions)
    if options.val_data is not None:
        train, val = pairs, read_pairs(Path(options.val_data))
    else:
        train, val = split_pairs(pairs, options.val_fraction)
    if len(train) < options.batch_size:
        raise DatasetError(
            f"batch size {options.batch_size} is larger than the {len(train)} training pairs of {options.data}; "
            "lower --batch-size"
        )
    logger.info("%d training pairs, %d held out for evaluation", len(train), len(val))
    return train, val


def split_pairs(pairs: Sequence[Pair], val_fraction: float) -> tuple[list[Pair], list[Pair]]:
    """Deterministic held-out split, independent of the training seed: ``(train, val)``, each in input order.

    ``round(len(pairs) * val_fraction)`` pairs are held out (at least one when ``val_fraction > 0``, and at least
    one is left for training); ``val_fraction == 0`` holds out nothing.
    """
    if val_fraction <= 0:
        return list(pairs), []
    if len(pairs) < 2:
        raise DatasetError(f"cannot hold out a validation split from {len(pairs)} pair(s); pass --val-fraction 0")
    count = min(len(pairs) - 1, max(1, round(len(pairs) * val_fraction)))
    held = set(torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SPLIT_SEED))[:count].tolist())
    train = [p for i, p in enumerate(pairs) if i not in held]
    return train, [p for i, p in enumerate(pairs) if i in held]


def _clip_only(built: tuple[ImageTextModel, Preprocess], what: str) -> tuple[CLIP, Preprocess]:
    model, preprocess = built
    if not isinstance(model, CLIP):
        raise UnknownModelError(f"--model {what!r} is a SigLIP; clip-train fit trains CLIP architectures only")
    return model, preprocess


def _build_model(options: FitOptions, state: TrainingState | None) -> tuple[CLIP, Preprocess]:
    """Resume: the checkpoint's architecture (weights restored later); else from scratch or the model to fine-tune."""
    if state is not None:
        return _clip_only(create_model(CLIPConfig.from_dict(state.config), seed=options.seed), options.model)
    path = Path(options.model).expanduser()
    if path.suffix == ".json" and path.is_file():
        model, preprocess = _clip_only(create_model(_read_config(path), seed=options.seed), options.model)
    elif options.model in list_configs() and not path.exists():
        model, preprocess = _clip_only(create_model(options.model, seed=options.seed), options.model)
    else:
        try:
            model, preprocess = _clip_only(load(options.model), options.model)
        except UnknownModelError as exc:
            raise UnknownModelError(
                f"--model {options.model!r} is not an architecture ({', '.join(list_configs())}), an architecture "
                f"JSON file, or a checkpoint or pretrained name to fine-tune. {exc}"
            ) from exc
        logger.info("fine-tuning %s", options.model)
        return model.train(), preprocess
    if options.loss == "siglip":
        with torch.no_grad():
            model.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
    logger.info("training %s from scratch", model.config.name or path)
    return model, preprocess


def _read_config(path: Path) -> CLIPConfig:
    try:
        return CLIPConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FitError(f"{path} is not an architecture config (see clip_model/configs/*.json): {exc!r}") from exc


def _prepare_out_dir(out: Path, options: FitOptions, step: int) -> None:
    """Create ``out``, record the options, and drop metrics past ``step`` (logged after the checkpoint resumed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / OPTIONS_FILE).write_text(options.to_json() + "\n", encoding="utf-8")
    metrics = out / METRICS_FILE
    kept = []
    if step > 0 and metrics.is_file():
        lines = metrics.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    metrics.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


class StepBatchSampler(torch.utils.data.Sampler[list[int]]):
    """This rank's slice of the global batch of each step in ``[start, stop)`` (see the module docstring)."""

    def __init__(self, num_pairs: int, batch_size: int, seed: int, start: int, stop: int, world: _World) -> None:
        self.num_pairs, self.batch_size, self.seed = num_pairs, batch_size, seed
        self.start, self.stop = start, stop
        self.local = batch_size // world.size
        self.offset = world.rank * self.local
        self.per_epoch = num_pairs // batch_size

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        for step in range(self.start, self.stop):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                order = _epoch_order(self.num_pairs, self.seed, epoch)
            first = (step % self.per_epoch) * self.batch_size + self.offset
            yield order[first : first + self.local].tolist()


def _epoch_order(num_pairs: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed + epoch))


class ContrastiveModule(nn.Module):
    """An image-text model plus what its loss needs; ``forward`` returns the global-batch loss.

    The sigmoid loss needs a learned bias: a SigLIP model's own ``logit_bias``, or, for a CLIP, the ``logit_bias``
    this module adds (None otherwise). The towers run under autocast when ``autocast_dtype`` is set; the loss is
    computed in float32.
    """

    model: ImageTextModel
    logit_bias: nn.Parameter | None

    def __init__(self, model: ImageTextModel, loss: Loss, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.autocast_dtype = autocast_dtype
        own = loss == "siglip" and not isinstance(model, SigLIP)
        self.register_parameter("logit_bias", nn.Parameter(torch.tensor(SIGLIP_INIT_LOGIT_BIAS)) if own else None)

    def sigmoid_bias(self) -> torch.Tensor | None:
        """The sigmoid loss's bias (this module's or the SigLIP model's); None with the softmax loss."""
        if self.loss != "siglip":
            return None
        return self.model.logit_bias if isinstance(self.model, SigLIP) else self.logit_bias

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """images [B, 3, R, R] float, tokens [B, L] int64 -> scalar loss over all ranks' pairs."""
        with _autocast(images.device, self.autocast_dtype):
            image_features = self.model.encode_image(images)  # [B, D]
            text_features = self.model.encode_text(tokens)  # [B, D]
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        bias = self.sigmoid_bias()
        if bias is None:
            return clip_loss(image_features, text_features, self.model.logit_scale)
        return siglip_loss(image_features, text_features, self.model.logit_scale, bias)


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _autocast_dtype(precision: Precision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``precision`` asks for on ``device``; None means plain float32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise FitError(f"--precision fp16 needs a CUDA device (this run uses {device}); use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass
class _Trainer:
    """The objects one optimizer step touches, and the step count."""

    options: FitOptions
    world: _World
    module: ContrastiveModule
    network: nn.Module  # ``module``, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    step: int = 0
    last_lr: float = 0.0

    @classmethod
    def create(
        cls, options: FitOptions, world: _World, device: torch.device, setup: ModelSetup, state: TrainingState | None
    ) -> _Trainer:
        dtype = _autocast_dtype(options.precision, device)
        model = setup.model
        if options.grad_checkpointing:
            model.set_grad_checkpointing(True)
        module = ContrastiveModule(model, options.loss, dtype).to(device)
        groups = setup.param_groups(module)
        if not any(group["params"] for group in groups):
            raise FitError("no parameter left to train: every one is frozen")
        optimizer = torch.optim.AdamW(groups, lr=options.lr, betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
        # fused: one kernel over all parameters instead of several per tensor, a large share of a small model's step
        scheduler = warmup_cosine(optimizer, options.warmup_steps, options.steps)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        trainer = cls(options, world, module, module, optimizer, scheduler, scaler)
        if state is not None:
            trainer.restore(state)
        if world.size > 1:
            if device.type == "cuda":
                # ResNet towers: batch statistics over the global batch (convert_sync_batchnorm is unannotated)
                module.model = nn.SyncBatchNorm.convert_sync_batchnorm(module.model)  # type: ignore[no-untyped-call]
            trainer.network = DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)
        return trainer

    def train_step(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """One optimizer step on this rank's slice of a global batch; returns the (detached) global loss."""
        device = self.module.model.logit_scale.device
        images = images.to(device, non_blocking=True)
        tokens = trim_for(self.module.model, tokens).to(device, non_blocking=True)
        loss: torch.Tensor = self.network(images, tokens)
        scaled = loss * self.world.size  # DDP averages gradients; the global loss needs their sum
        self.last_lr = max(float(group["lr"]) for group in self.optimizer.param_groups)  # the top layers' rate
        if self.scaler is None:
            scaled.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
            self.optimizer.step()
        else:
            self.scaler.scale(scaled).backward()  # type: ignore[no-untyped-call]  # unannotated in torch
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            self.module.model.logit_scale.clamp_(0, MAX_LOG_LOGIT_SCALE)
        self.step += 1
        return loss.detach()

    def state(self) -> TrainingState:
        extra = {} if self.module.logit_bias is None else {"logit_bias": self.module.logit_bias.detach().cpu()}
        return TrainingState(
            step=self.step,
            model={k: v.detach().cpu() for k, v in self.module.model.state_dict().items()},
            config=self.module.model.config.to_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            extra=extra,
            rng=capture_rng(),
            options=self.options.to_json(),
        )

    def restore(self, state: TrainingState) -> None:
        self.module.model.load_state_dict(state.model, strict=True)
        if self.module.logit_bias is not None:
            with torch.no_grad():
                self.module.logit_bias.copy_(state.extra["logit_bias"])
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        self.step = state.step
        restore_rng(state.rng)

    def record(self, loss: float, samples_per_s: float) -> dict[str, Any]:
        if not math.isfinite(loss):
            raise FitError(f"loss is {loss} at step {self.step}: training diverged; lower --lr or try --precision fp32")
        record = {
            "step": self.step,
            "loss": loss,
            "lr": self.last_lr,
            "logit_scale": float(self.module.model.logit_scale.detach().exp()),
            "samples_per_s": samples_per_s,
        }
        bias = self.module.sigmoid_bias()
        if bias is not None:
            record["logit_bias"] = float(bias.detach())
        return record


def _due(step: int, every: int, stop: int) -> bool:
    return step == stop or (every > 0 and step % every == 0)


def _train(
    trainer: _Trainer, loader: DataLoader[Any], stop: int, evaluator: _Evaluator | None, out: Path
) -> dict[str, Any]:
    """Run the steps up to ``stop``, logging, evaluating and saving as the options say; the last record."""
    options, main = trainer.options, trainer.world.is_main
    record: dict[str, Any] = {"step": trainer.step}
    progress = _Progress(main, trainer.step, options.steps)
    tick, since = time.perf_counter(), trainer.step
    try:
        for images, tokens in loader:
            loss = trainer.train_step(images, tokens)
            step = trainer.step
            evaluate = evaluator is not None and _due(step, options.eval_every, stop)
            if evaluate or _due(step, options.log_every, stop):
                record = trainer.record(float(loss), (step - since) * options.batch_size / (time.perf_counter() - tick))
                if evaluate and main and evaluator is not None:
                    record.update(evaluator(trainer.module.model))
                if main:
                    _append_jsonl(out / METRICS_FILE, record)
                progress.update(record)
                tick, since = time.perf_counter(), step
            if main and _due(step, options.save_every, stop):
                path = save_state(out / CHECKPOINT_DIR, trainer.state())
                logger.debug("saved %s", path)
    finally:
        progress.close()
    return record


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


class _Progress:
    """A tqdm bar on a terminal (rank 0), otherwise one log line per logged step."""

    def __init__(self, enabled: bool, start: int, total: int) -> None:
        self.enabled = enabled
        self.total = total
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", desc="training", dynamic_ncols=True)
        self.position = start

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(record["step"] - self.position)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        self.position = record["step"]
        evals = ", ".join(f"{k} {v:.3f}" for k, v in record.items() if "@" in k or k.startswith("zero_shot"))
        if self.bar is None or evals:
            logger.info(
                "step %d/%d loss %.4f lr %.2e logit_scale %.1f %.0f samples/s%s",
                record["step"],
                self.total,
                record["loss"],
                record["lr"],
                record["logit_scale"],
                record["samples_per_s"],
                f"; {evals}" if evals else "",
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Evaluator:
    """Retrieval recall@k on held-out pairs (:mod:`clip_model.train.evaluate`'s rules and metric names), plus
    ``zero_shot_accuracy_photo`` (one prompt, "a photo of a {}.") when every held-out pair has a label."""

    def __init__(self, pairs: Sequence[Pair], preprocess: Preprocess) -> None:
        self.pairs = list(pairs)
        self.preprocess = preprocess
        self.labelled = all(p.label is not None for p in self.pairs)

    def __call__(self, model: ImageTextModel) -> dict[str, float]:
        """Metrics of ``model`` (in float32, eval mode) on the held-out pairs; leaves the model in train mode."""
        model.eval()
        try:
            encoded = encode_dataset(model, self.preprocess, self.pairs, EVAL_BATCH_SIZE)
            captions = [pair.caption for pair in self.pairs]
            metrics = retrieval_metrics(
                encoded.image_features, encoded.text_features, captions, encoded.texts, RECALL_KS
            )
            if self.labelled:
                metrics[ZERO_SHOT_METRIC] = zero_shot_accuracy(
                    model, self.preprocess, self.pairs, ZERO_SHOT_TEMPLATES, image_features=encoded.image_features
                )
        finally:
            model.train()
        return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``clip-train fit`` flags; each mirrors a :class:`FitOptions` field."""
    d = FitOptions(data=Path(), model="", out_dir=Path())
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="training folder: images plus captions.jsonl or captions.csv (path, caption[, label]), "
        "or same-named .txt caption files",
    )
    parser.add_argument("--captions", type=Path, help="captions file for --data when it is not in the folder")
    parser.add_argument(
        "--val-data",
        type=Path,
        help="held-out folder for evaluation (same layouts as --data); default: hold out --val-fraction of --data",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help="fraction of --data held out for evaluation when --val-data is not given; 0: no evaluation",
    )
    parser.add_argument(
        "--model",
        required=True,
        help=f"train from scratch: an architecture ({', '.join(list_configs())}) or a JSON architecture file; "
        "fine-tune: a checkpoint path (.pt, .safetensors, Hugging Face folder) or a pretrained name (ViT-B-32/openai)",
    )
    parser.add_argument("--out", dest="out_dir", type=Path, required=True, help="output folder (see clip-train docs)")
    add_training_arguments(parser, d)


def add_training_arguments(parser: argparse.ArgumentParser, d: FitOptions, leave_out: Sequence[str] = ()) -> None:
    """The flags of :class:`FitOptions`' training fields, with ``d``'s values as defaults, but for the fields
    named in ``leave_out`` (``"lr"``, ``"loss"``), which a caller whose defaults depend on other flags adds."""
    parser.add_argument("--steps", type=int, default=d.steps, help="optimizer steps of the whole run")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, split over processes")
    if "lr" not in leave_out:
        parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (~1e-5 to fine-tune)")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay of weight matrices")
    parser.add_argument("--warmup", dest="warmup_steps", type=int, default=d.warmup_steps, help="linear warmup steps")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps; 0: at the end")
    parser.add_argument(
        "--save-every", type=int, default=d.save_every, help="training checkpoint every N steps; 0: at the end"
    )
    parser.add_argument("--log-every", type=int, default=d.log_every, help="metrics record every N steps")
    if "loss" not in leave_out:
        parser.add_argument("--loss", choices=LOSSES, default=d.loss, help="contrastive softmax (clip) or sigmoid")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=d.precision,
        help="auto: bf16 autocast on CUDA with bf16 support, fp16 with loss scaling on older CUDA, fp32 on CPU",
    )
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of initialization and data order")
    parser.add_argument("--workers", dest="num_workers", type=int, default=d.num_workers, help="loader processes")
    parser.add_argument(
        "--preload-mb",
        type=int,
        default=d.preload_mb,
        help="decode the training images once into memory when their pixels fit in this many MiB (then no loader "
        "processes); 0: decode per step",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--stop-after", type=int, help="end this invocation after step N (resume later)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ...; default: cuda when available, else cpu")


def run(args: argparse.Namespace) -> int:
    """Train as the parsed flags say; 0 when done."""
    options = FitOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(FitOptions)})
    result = fit(options)
    if int(os.environ.get("RANK", 0)) == 0:
        logger.info("done at step %d: %s, metrics in %s", result.step, result.model_path, result.metrics_path)
    return 0
