"""Where the encoders run, and in which arithmetic: the one rule behind the device setting of the indexer
(``--device``), its Ray workers and the server (``CLIPSEARCH_DEVICE``), and how it meets the precision setting
(``--precision`` / ``CLIPSEARCH_PRECISION``).

The device setting is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (case aside, nothing else):

* ``auto``: ``cuda:0`` when ``torch.cuda.is_available()``, else ``cpu``.
* ``cuda`` is ``cuda:0``, the first CUDA device this process sees (``CUDA_VISIBLE_DEVICES``, or Ray for an actor
  that reserved GPUs, decides which one that is). ``cuda`` and ``cuda:N`` are refused where CUDA is not available or
  ``N`` is not below ``torch.cuda.device_count()``: never a silent fall back to the CPU.

The precision is ``fp32``, ``int8`` or ``fp16``, or left unset; with the device it gives the arithmetic:

=============  ====================================================  ========================================
precision      on the CPU                                            on CUDA
=============  ====================================================  ========================================
unset          fp32                                                  fp16
``fp32``       float32, linear layers in oneDNN's packed layout      float32 (no packing: oneDNN is the CPU's)
``int8``       int8 linear layers (:mod:`clip_model.quantize`)       refused: int8 is CPU-only
``fp16``       refused: fp16 is the CUDA arithmetic                  float16 weights and activations
=============  ====================================================  ========================================

So ``auto`` with the precision unset is exactly the CPU behaviour on a machine without CUDA, and fp16 on one with
it. A CPU-only precision given explicitly is never moved to the CPU behind the user's back: ``auto`` that finds CUDA
with ``int8`` asked for is refused, and the error says to set the device to ``cpu`` (or to leave the precision unset).
Every refusal is a ``ValueError`` naming the settings involved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

import torch

InferencePrecision = Literal["fp32", "int8", "fp16"]  # the precision setting's values (unset: None)
INFERENCE_PRECISIONS: tuple[InferencePrecision, ...] = get_args(InferencePrecision)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")  # the device setting's forms, as help texts show them
DEFAULT_DEVICE = "auto"
CPU_ONLY: frozenset[str] = frozenset({"int8"})  # int8 runs torch._int_mm through oneDNN (clip_model.quantize)
CUDA_ONLY: frozenset[str] = frozenset({"fp16"})
DEVICE_SETTING = "--device / CLIPSEARCH_DEVICE"
PRECISION_SETTING = "--precision / CLIPSEARCH_PRECISION"
_DEVICE_FORM = re.compile(r"auto|cpu|cuda(?::(\d+))?")


@dataclass(frozen=True)
class Placement:
    """A resolved device setting: ``device`` is ``cpu`` or ``cuda:N`` (always with its index), ``precision`` the
    arithmetic the encoders run in there."""

    device: torch.device
    precision: InferencePrecision

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the floating-point weights are held in (int8 keeps its float parts in float32)."""
        return torch.float16 if self.precision == "fp16" else torch.float32

    def __str__(self) -> str:
        return f"{self.device} ({self.precision})"


def parse_device(setting: str) -> str:
    """The device setting in its normal form: ``auto``, ``cpu``, ``cuda:N`` (``cuda`` becomes ``cuda:0``).

    Raises:
        ValueError: anything else, naming the setting and its forms.
    """
    form = setting.strip().lower()
    match = _DEVICE_FORM.fullmatch(form)
    if match is None:
        raise ValueError(f"device {setting!r} ({DEVICE_SETTING}) is not one of {', '.join(DEVICE_CHOICES)}")
    if form.startswith("cuda"):
        return f"cuda:{int(match.group(1) or 0)}"
    return form


def resolve_device(setting: str) -> torch.device:
    """The device ``setting`` names on this machine (``auto`` decided here, by ``torch.cuda.is_available()``).

    Raises:
        ValueError: ``setting`` is malformed, or names a CUDA device this machine does not have (the error says what
            was asked and what there is).
    """
    form = parse_device(setting)
    if form == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if form == "auto":
        return torch.device("cuda", 0) if available else torch.device("cpu")
    if not available:
        raise ValueError(
            f"device {setting!r} ({DEVICE_SETTING}) asks for CUDA, but {_no_cuda()}: set it to cpu (or auto, which "
            "takes CUDA where there is some)"
        )
    index, count = int(form.removeprefix("cuda:")), torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"device {setting!r} ({DEVICE_SETTING}): this process sees {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def choose_precision(device: torch.device, precision: str | None, setting: str | None = None) -> InferencePrecision:
    """The arithmetic on ``device`` (its type is what counts) for the precision setting ``precision`` (None: left
    unset), by the module docstring's table. ``setting`` is the device setting as given, quoted in errors.

    Raises:
        ValueError: ``precision`` is unknown, or cannot run on ``device``, naming both settings.
    """
    chosen = _known_precision(precision) if precision is not None else None
    asked = f"device {setting!r} ({DEVICE_SETTING}) chose {device}" if setting else f"the device is {device}"
    if device.type == "cuda":
        if chosen in CPU_ONLY:
            raise ValueError(
                f"precision {chosen!r} ({PRECISION_SETTING}) runs on the CPU only, and {asked}: set the device to "
                "cpu to encode in int8, or leave the precision unset for fp16 on CUDA"
            )
        return chosen or "fp16"
    if chosen in CUDA_ONLY:
        raise ValueError(
            f"precision {chosen!r} ({PRECISION_SETTING}) runs on CUDA only, and {asked}: leave the precision unset "
            "(fp32), or choose fp32 or int8 for the CPU"
        )
    return chosen or "fp32"


def resolve_placement(device: str = DEFAULT_DEVICE, precision: str | None = None) -> Placement:
    """Where and in which arithmetic the encoders run for the two settings (module docstring).

    Raises:
        ValueError: as :func:`resolve_device` and :func:`choose_precision`.
    """
    resolved = resolve_device(device)
    return Placement(resolved, choose_precision(resolved, precision, device))


def _known_precision(precision: str) -> InferencePrecision:
    for known in INFERENCE_PRECISIONS:
        if precision == known:
            return known
    raise ValueError(f"precision {precision!r} ({PRECISION_SETTING}) is not one of {', '.join(INFERENCE_PRECISIONS)}")


def _no_cuda() -> str:
    """Why ``torch.cuda.is_available()`` is False, as far as torch tells."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return f"this torch ({torch.__version__}, CUDA {torch.version.cuda}) finds no usable CUDA device"
