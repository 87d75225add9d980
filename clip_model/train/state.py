"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A training checkpoint is ``<out>/checkpoints/step-000123.pt``, a ``torch.save`` dict that holds only tensors and
primitives, so it reads back with ``torch.load(weights_only=True)``:

* ``model``: the CLIP state dict; ``config``: the architecture (``CLIPConfig.to_dict()``). These are the keys
  :func:`clip_model.read_checkpoint` looks for, so ``clip_model.load("step-000123.pt")`` gives the model.
* ``extra``: other trained tensors that are not part of CLIP (the SigLIP ``logit_bias``).
* ``optimizer``, ``scheduler``, ``scaler`` (None without fp16 loss scaling): their ``state_dict()``.
* ``step``: optimizer steps taken; ``rng``: torch CPU (and CUDA) generator states and Python's ``random`` state.
* ``options``: the run's options as a JSON string; ``format``: :data:`STATE_FORMAT`.

Files are written atomically (a temporary file, then ``os.replace``) and only the newest :data:`KEEP_LAST` are kept.
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FORMAT = 1  # bump when the layout of a training checkpoint changes
KEEP_LAST = 2  # training checkpoints kept per run; older ones are deleted after each save
STATE_NAME = re.compile(r"step-(\d{6,})\.pt")


@dataclass
class TrainingState:
    """The contents of one training checkpoint (see the module docstring)."""

    step: int
    model: dict[str, torch.Tensor]
    config: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    options: str = "{}"


def state_path(folder: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in ``folder``."""
    return Path(folder) / f"step-{step:06d}.pt"


def list_states(folder: Path) -> list[Path]:
    """Training checkpoints in ``folder``, oldest (lowest step) first; empty if the folder does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STATE_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_state(folder: Path) -> Path | None:
    """The newest training checkpoint in ``folder``, or None."""
    states = list_states(folder)
    return states[-1] if states else None


def save_state(folder: Path, state: TrainingState, keep: int = KEEP_LAST) -> Path:
    """Write ``state`` atomically as ``folder/step-NNNNNN.pt`` and delete all but the newest ``keep`` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = state_path(folder, state.step)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    payload = {"format": STATE_FORMAT, **vars(state)}
    try:
        torch.save(payload, partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    for old in list_states(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_state(path: Path) -> TrainingState:
    """Read a training checkpoint written by :func:`save_state` (weights-only; never runs code from the file)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for disallowed globals, RuntimeError for corrupt zips
        raise CheckpointError(f"cannot read training checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a training checkpoint of format {STATE_FORMAT} (found {found!r})")
    payload.pop("format")
    return TrainingState(**payload)


def capture_rng() -> dict[str, Any]:
    """The global random generator states: torch CPU, every CUDA device (if any), Python ``random``."""
    version, internal, gauss = random.getstate()
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the generators to states from :func:`capture_rng` (CUDA states only where CUDA is available)."""
    torch.set_rng_state(rng["torch"])
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
