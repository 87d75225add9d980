"""``clip-train finetune``: adapt a pretrained model to your own captioned images with LoRA or full fine-tuning,
evaluated on held-out pairs before and after.

Methods:

* ``lora`` (default): adapters (:mod:`clip_model.train.lora`) on the attention and MLP projections of both towers
  (``--lora-rank``, ``--lora-alpha``, ``--lora-dropout``, ``--lora-targets``); every other weight, the temperature
  included, stays frozen.
* ``full``: every weight trains, with layer-wise learning-rate decay (:mod:`clip_model.train.layers`).

``--freeze image|text`` keeps a tower as it is (with LoRA: no adapters in it); a frozen tower's BatchNorm layers keep
their running statistics and normalize with them. Both methods run :func:`clip_model.train.fit.fit`'s loop (AMP,
resume, evaluation every ``--eval-every`` steps, torchrun) on a :class:`~clip_model.train.fit.ModelSetup`. Every
family :func:`clip_model.load` reads can be fine-tuned: CLIP (ViT or ResNet), SigLIP (its sigmoid loss and own bias),
XLM-RoBERTa CLIP; captions go through the model's own tokenizer.

Checked before any training step, each with a message saying what to change: images of a data folder without a
caption, images that do not decode, fewer training pairs than the batch size, no held-out pairs, a LoRA rank above
a targeted layer's size or a target that matches nothing, an ``--out`` that holds files (unless ``--overwrite``, or
``--resume`` with the same fine-tuning options).

``--out`` holds fit's ``metrics.jsonl``, ``options.json`` and ``checkpoints/`` (a LoRA run's hold the adapted model,
for ``--resume``), and::

    model.safetensors    the fine-tuned model, adapters merged: clip_model.load, clip-index and clip-serve read it
                         like any other. Its metadata entry "clip_model_finetune" records the provenance: the base
                         model and its weights' sha256, the method and its options, the sha256 of the training data.
                         Its weights are not the base's, so a server pinned to it refuses an index built with the
                         base (clip-index build --rebuild --model <it> re-embeds the collection).
    adapter.safetensors  (lora) the adapters alone, with the same provenance (clip_model.train.lora.load_adapter)
    spiece.model, ...    the base's SentencePiece vocabulary (SigLIP, XLM-RoBERTa), so the model loads with it
    finetune.json        the fine-tuning options; a --resume must repeat them
    evaluation.json      held-out metrics before and after, training time, peak memory, trainable parameters
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn

from ..checkpoint import save_checkpoint, weights_sha256
from ..factory import load
from ..model import CLIP, ImageTextModel
from ..preprocess import Preprocess
from ..siglip import SigLIP
from ..siglip_convert import SENTENCEPIECE_FILES
from .data import Pair
from .evaluate import evaluate, format_table
from .fit import (
    CHECKPOINT_DIR,
    EVAL_BATCH_SIZE,
    LOSSES,
    METRICS_FILE,
    MODEL_FILE,
    OPTIONS_FILE,
    FitError,
    FitOptions,
    Loss,
    ModelSetup,
    add_training_arguments,
    check_options,
    fit,
    read_data,
)
from .inputs import check_captioned, inspect_images
from .layers import freeze_towers, hold_frozen_batch_norm, layer_decay_groups
from .lora import KINDS, TOWERS, LoRAConfig, apply_lora, merge_lora, parameter_counts, save_adapter
from .schedule import param_groups

logger = logging.getLogger(__name__)

Method = Literal["lora", "full"]
METHODS: tuple[Method, ...] = get_args(Method)
DEFAULT_LR: dict[Method, float] = {"lora": 5e-4, "full": 1e-5}
DEFAULT_LAYER_DECAY = 0.75  # full fine-tuning: each block down from the top learns at 0.75x the one above
ADAPTER_FILE = "adapter.safetensors"
SETTINGS_FILE = "finetune.json"
EVALUATION_FILE = "evaluation.json"
PROVENANCE_KEY = "clip_model_finetune"  # model.safetensors metadata entry
PROVENANCE_FORMAT = 1
VOCABULARY_FILES = dict(zip(("siglip", "siglip2", "xlm-roberta"), SENTENCEPIECE_FILES, strict=True))  # by flavor
OUTPUTS = (MODEL_FILE, ADAPTER_FILE, SETTINGS_FILE, EVALUATION_FILE, METRICS_FILE, OPTIONS_FILE, CHECKPOINT_DIR)
KIB = 1024


@dataclass(frozen=True)
class FinetuneOptions:
    """One fine-tuning run: ``fit``'s options (``fit.model`` is the base: a checkpoint path or pretrained name;
    ``fit.loss`` is not read), the method and its options (module docstring). ``layer_decay`` applies to ``full``."""

    fit: FitOptions
    method: Method = "lora"
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    layer_decay: float = DEFAULT_LAYER_DECAY
    freeze: tuple[str, ...] = ()
    loss: Loss | None = None  # replaces fit.loss; None: the family's (sigmoid for SigLIP, softmax for the others)
    overwrite: bool = False

    def settings(self) -> dict[str, Any]:
        """What a resumed run must repeat: the method and its options."""
        lora = dataclasses.asdict(self.lora) if self.method == "lora" else None
        decay = self.layer_decay if self.method == "full" else None
        return {"method": self.method, "lora": lora, "layer_decay": decay, "freeze": sorted(self.freeze)}


@dataclass(frozen=True)
class FinetuneReport:
    """What :func:`finetune` measured (rank 0; other ranks get empty metrics)."""

    before: dict[str, float]
    after: dict[str, float]
    train_seconds: float
    peak_memory_mib: float  # the process's peak resident set (CPU), or the peak CUDA allocation on a GPU
    trainable_parameters: int
    total_parameters: int
    model_path: Path
    adapter_path: Path | None

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


def finetune(options: FinetuneOptions) -> FinetuneReport:
    """Fine-tune as ``options`` say and write ``options.fit.out_dir`` (module docstring).

    Raises:
        FitError: inconsistent options, an occupied ``--out``. DatasetError: data that cannot train (module
        docstring). ValueError: LoRA options that do not fit the model. What :func:`clip_model.load` raises.
    """
    _check_options(options)
    check_options(options.fit)
    out, main = Path(options.fit.out_dir), int(os.environ.get("RANK", 0)) == 0
    _check_out_dir(out, options)
    train, held_out = read_data(options.fit)
    if not held_out:
        raise FitError("finetune evaluates on held-out pairs before and after: pass --val-data or --val-fraction > 0")
    data_sha256 = _check_data(options.fit, train, held_out)
    model, preprocess = load(options.fit.model, device=_eval_device(options.fit))
    loss = _loss_for(model, options.loss)
    base = _provenance(options, model, data_sha256, len(train))
    setup = _setup(options, model, preprocess, base)  # the LoRA checks run here, before any step
    if main:
        _claim_out_dir(out, options)
    before = _evaluate(setup.model, preprocess, held_out) if main else {}
    fit_options = dataclasses.replace(options.fit, loss=loss)
    trainable, total = parameter_counts(setup.model)
    started = time.perf_counter()
    fit(fit_options, setup)
    seconds = time.perf_counter() - started
    adapter = out / ADAPTER_FILE if options.method == "lora" else None
    report = FinetuneReport({}, {}, seconds, _peak_memory_mib(), trainable, total, out / MODEL_FILE, adapter)
    if not main:
        return report
    tuned, tuned_preprocess = load(out / MODEL_FILE, device=_eval_device(options.fit))
    report = dataclasses.replace(report, before=before, after=_evaluate(tuned, tuned_preprocess, held_out))
    record = {"provenance": base, "held_out_pairs": len(held_out), **report.to_dict()}
    (out / EVALUATION_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return report


def _check_options(options: FinetuneOptions) -> None:
    problems = []
    if options.method not in METHODS:
        problems.append(f"method must be one of {', '.join(METHODS)}, got {options.method!r}")
    if not 0 < options.layer_decay <= 1:
        problems.append(f"layer decay (--layer-decay) must be in (0, 1], got {options.layer_decay}")
    if set(options.freeze) - set(TOWERS) or set(options.freeze) == set(TOWERS):
        problems.append(f"--freeze takes one tower of {', '.join(TOWERS)}, got {', '.join(options.freeze)}")
    if problems:
        raise FitError("invalid fine-tuning options: " + "; ".join(problems))


def _check_out_dir(out: Path, options: FinetuneOptions) -> None:
    """FitError for an ``out`` that holds files, unless ``overwrite``, or ``resume`` with the same settings."""
    if not out.exists() or not any(out.iterdir()):
        return
    if options.fit.resume:
        saved = out / SETTINGS_FILE
        found = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else None
        if found != json.loads(json.dumps(options.settings())):
            raise FitError(f"--resume: {out} holds a run with other fine-tuning options ({found}); repeat them")
    elif not options.overwrite:
        raise FitError(f"{out} already holds files: pass --overwrite to replace its outputs, or choose another --out")


def _claim_out_dir(out: Path, options: FinetuneOptions) -> None:
    """Remove the outputs of an earlier run (``overwrite``) and record this run's settings."""
    if options.overwrite and not options.fit.resume:
        for name in (*OUTPUTS, *SENTENCEPIECE_FILES):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(options.settings(), sort_keys=True) + "\n", encoding="utf-8")


def _check_data(options: FitOptions, train: list[Pair], held_out: list[Pair]) -> str:
    """Every image captioned and decodable (DatasetError otherwise); returns the training data's sha256."""
    check_captioned(Path(options.data), [*train, *held_out] if options.val_data is None else train)
    if options.val_data is not None:
        check_captioned(Path(options.val_data), held_out)
    return inspect_images(Path(options.data), train, held_out)


def _loss_for(model: ImageTextModel, asked: Loss | None) -> Loss:
    """``asked``, or the family's loss: the sigmoid loss for a SigLIP (FitError if asked for another), else softmax."""
    if isinstance(model, SigLIP):
        if asked == "clip":
            raise FitError("a SigLIP model is fine-tuned with its sigmoid loss: leave out --loss, or pass siglip")
        return "siglip"
    return asked or "clip"


def _provenance(options: FinetuneOptions, model: ImageTextModel, data_sha256: str, pairs: int) -> dict[str, Any]:
    path = Path(options.fit.model).expanduser()
    return {
        "format": PROVENANCE_FORMAT,
        "base_model": str(path.resolve()) if path.exists() else options.fit.model,
        "base_weights_sha256": weights_sha256(model),
        **options.settings(),
        "data": str(Path(options.fit.data).resolve()),
        "data_sha256": data_sha256,
        "train_pairs": pairs,
        "steps": options.fit.steps,
        "lr": options.fit.lr,
    }


def _setup(options: FinetuneOptions, model: ImageTextModel, preprocess: Preprocess, base: dict[str, Any]) -> ModelSetup:
    """The model to train (adapters or frozen towers in place, in train mode), its groups and its saving."""
    fit_options = options.fit
    if options.method == "lora":
        towers = tuple(t for t in TOWERS if t not in options.freeze)
        lora = dataclasses.replace(options.lora, towers=towers)
        apply_lora(model, lora, seed=fit_options.seed)

        def groups(module: nn.Module) -> list[dict[str, Any]]:
            return param_groups(module, fit_options.weight_decay)
    else:
        freeze_towers(model, options.freeze)
        lora = None

        def groups(module: nn.Module) -> list[dict[str, Any]]:
            return layer_decay_groups(module, fit_options.lr, fit_options.weight_decay, options.layer_decay)

    hold_frozen_batch_norm(model)
    vocabulary = None if isinstance(model, CLIP) else model.tokenizer_path

    def save(trained: ImageTextModel, path: Path) -> None:
        _save_outputs(trained, path, lora, base, vocabulary)

    return ModelSetup(model.train(), preprocess, groups, save)


def _save_outputs(
    model: ImageTextModel, path: Path, lora: LoRAConfig | None, base: dict[str, Any], vocabulary: Path | None
) -> None:
    """``path``: the model with its adapters merged and the provenance; beside it the adapters and vocabulary."""
    metadata = {PROVENANCE_KEY: json.dumps(base, sort_keys=True)}
    if lora is None:
        save_checkpoint(model, path, metadata)
    else:
        save_checkpoint(merge_lora(copy.deepcopy(model)).eval(), path, metadata)
        save_adapter(model, lora, base["base_weights_sha256"], path.parent / ADAPTER_FILE, extra=base)
    if vocabulary is not None and not isinstance(model, CLIP):
        shutil.copyfile(vocabulary, path.parent / VOCABULARY_FILES[str(model.config.tokenizer)])


def read_provenance(path: Path) -> dict[str, Any] | None:
    """The fine-tuning provenance a ``model.safetensors`` written by :func:`finetune` carries; None for others."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        entry = (handle.metadata() or {}).get(PROVENANCE_KEY)
    return dict(json.loads(entry)) if entry is not None else None


def _eval_device(options: FitOptions) -> torch.device:
    if options.device is not None:
        return torch.device(options.device)
    return (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    )


def _evaluate(model: ImageTextModel, preprocess: Preprocess, pairs: list[Pair]) -> dict[str, float]:
    """:func:`clip_model.train.evaluate.evaluate`'s metrics in eval mode; leaves the model's mode as it was."""
    training = model.training
    model.eval()
    try:
        return evaluate(model, preprocess, pairs, batch_size=EVAL_BATCH_SIZE)
    finally:
        model.train(training)


def _peak_memory_mib() -> float:
    if torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0:
        return torch.cuda.max_memory_allocated() / KIB / KIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / KIB  # Linux reports KiB


def comparison_table(before: dict[str, float], after: dict[str, float]) -> str:
    """``metric  before  after  change`` lines, one per metric (labels as :func:`~.evaluate.format_table`'s)."""
    labels = [line.rsplit("  ", 1)[0].rstrip() for line in format_table(before).splitlines()]
    width = max(len(label) for label in [*labels, "metric"])
    lines = [f"{'metric':<{width}}  {'before':>7}  {'after':>7}  {'change':>7}"]
    for label, (key, old) in zip(labels, before.items(), strict=True):
        new = after[key]
        lines.append(f"{label:<{width}}  {old:7.4f}  {new:7.4f}  {new - old:+7.4f}")
    return "\n".join(lines) + "\n"


def _targets(text: str) -> tuple[str, ...]:
    targets = tuple(part.strip() for part in text.split(",") if part.strip())
    if not targets:
        raise argparse.ArgumentTypeError(f"name at least one kind ({', '.join(KINDS)}) or glob")
    return targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``clip-train finetune`` flags: fit's data and training flags, the method's, ``--overwrite``."""
    d = FitOptions(data=Path(), model="", out_dir=Path(), steps=500, warmup_steps=50, weight_decay=0.1)
    parser.add_argument("--model", required=True, help="the base: a checkpoint path or a pretrained name")
    parser.add_argument("--data", type=Path, required=True, help="captioned folder (see clip-train fit --help)")
    parser.add_argument("--captions", type=Path, help="captions file for --data when it is not in the folder")
    parser.add_argument("--val-data", type=Path, help="held-out folder; default: hold out --val-fraction of --data")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of --data held out")
    parser.add_argument("--out", dest="out_dir", type=Path, required=True, help="output folder (clip-train docs)")
    parser.add_argument("--method", choices=METHODS, default="lora", help="LoRA adapters, or every weight")
    parser.add_argument("--lora-rank", type=int, default=LoRAConfig.rank, help="rank of each adapter")
    parser.add_argument("--lora-alpha", type=float, default=LoRAConfig.alpha, help="updates scaled by alpha / rank")
    parser.add_argument("--lora-dropout", type=float, default=LoRAConfig.dropout, help="dropout on adapter inputs")
    parser.add_argument(
        "--lora-targets",
        type=_targets,
        default=",".join(KINDS),
        help="comma-separated kinds (q, k, v: attention query/key/value; out: attention output; fc, proj: the MLP) "
        "or globs over projection names (visual.*, *.resblocks.1[01].*)",
    )
    parser.add_argument(
        "--layer-decay",
        type=float,
        default=DEFAULT_LAYER_DECAY,
        help="full: each block learns at this times the rate of the one above it; 1: no decay",
    )
    parser.add_argument("--freeze", choices=TOWERS, action="append", default=[], help="a tower to leave as it is")
    parser.add_argument("--lr", type=float, help=f"peak learning rate; default {DEFAULT_LR['lora']:g} (lora), "
                        f"{DEFAULT_LR['full']:g} (full)")  # fmt: skip
    parser.add_argument("--loss", choices=LOSSES, help="default: sigmoid (siglip) for a SigLIP, softmax (clip) else")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --out")
    add_training_arguments(parser, d, leave_out=("lr", "loss"))


def run(args: argparse.Namespace) -> int:
    """Fine-tune as the parsed flags say, print the before/after table; 0 when done."""
    method: Method = args.method
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(FitOptions) if hasattr(args, f.name)}
    fields["lr"] = args.lr if args.lr is not None else DEFAULT_LR[method]
    del fields["loss"]  # FinetuneOptions.loss: None is the family's
    lora = LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_targets)
    options = FinetuneOptions(
        FitOptions(**fields), method, lora, args.layer_decay, tuple(args.freeze), args.loss, args.overwrite
    )
    report = finetune(options)
    if int(os.environ.get("RANK", 0)) == 0:
        trainable = f"{report.trainable_parameters:,} of {report.total_parameters:,} parameters trained"
        share = 100 * report.trainable_parameters / report.total_parameters
        sys.stdout.write(
            f"{options.fit.model} -> {report.model_path} ({method}; {trainable}, {share:.2f}%; "
            f"{report.train_seconds:.0f} s, peak memory {report.peak_memory_mib:.0f} MiB)\n"
        )
        sys.stdout.write(comparison_table(report.before, report.after))
    return 0
