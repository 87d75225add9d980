"""Linear probe: multinomial logistic regression on frozen unit image features, as in the CLIP paper.

The classifier is ``logits = features @ weight.T + bias`` over C classes, fit by full-batch L-BFGS on the mean
cross-entropy plus ``l2 / 2 * ||weight||^2`` (the bias is not penalised). ``l2`` is chosen from :data:`L2_GRID` by
accuracy on a stratified validation split carved from the training data with a fixed seed (ties go to the stronger
regularisation), then the probe is refit on all training data with that ``l2``.

A probe file is ``.safetensors`` with tensors ``weight`` [C, D] and ``bias`` [C] (float32) and metadata: the format
tag, the class names (JSON list, row order) and the sha256 fingerprint of the CLIP weights whose features it was fit
on (:func:`clip_model.weights_sha256`), so :func:`load_probe` can refuse features of another model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import weights_sha256
from ..errors import ClipModelError
from ..factory import load
from ..model import ImageTextModel
from ..preprocess import Preprocess
from .data import DatasetError, Pair, read_labelled
from .evaluate import DEFAULT_BATCH_SIZE, add_model_arguments, encode_images, write_json

logger = logging.getLogger(__name__)

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # candidate weight-decay strengths on the mean cross-entropy
DEFAULT_L2 = 1e-4  # used when the training data is too small to carve a validation split from
MAX_ITERATIONS = 500  # L-BFGS iterations per fit
LBFGS_HISTORY = 20  # curvature pairs L-BFGS keeps
GRAD_TOLERANCE = 1e-5  # stop when the largest gradient entry falls below this
CHANGE_TOLERANCE = 1e-7  # or when the loss or the largest step entry changes less than this
DEFAULT_VAL_FRACTION = 0.2  # of the training data, for choosing l2
DEFAULT_TEST_FRACTION = 0.2  # of the labelled folder, when no --test folder is given
PROBE_FORMAT = "clip_model.linear_probe/1"
FORMAT_KEY, CLASSNAMES_KEY, SHA_KEY, L2_KEY = "format", "classnames", "model_weights_sha256", "l2"


class ProbeError(ClipModelError, ValueError):
    """A probe file that cannot be read, or that was fit on another model's features."""


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: ``weight`` [C, D] and ``bias`` [C] float32 over ``classnames`` (row order)."""

    weight: torch.Tensor
    bias: torch.Tensor
    classnames: tuple[str, ...]
    model_sha256: str | None = None
    l2: float = 0.0

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores ``[N, C]`` for image features ``[N, D]`` (L2-normalized here, as in fitting)."""
        if features.ndim != 2 or features.shape[1] != self.weight.shape[1]:
            raise ValueError(f"features must be [N, {self.weight.shape[1]}], got {list(features.shape)}")
        return F.normalize(features.float(), dim=-1) @ self.weight.T + self.bias

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted class indices, int64 ``[N]``, for features ``[N, D]``."""
        return self.logits(features).argmax(dim=1)

    def predict_labels(self, features: torch.Tensor) -> list[str]:
        """Predicted class names for features ``[N, D]``."""
        return [self.classnames[i] for i in self.predict(features).tolist()]

    def save(self, path: str | Path) -> Path:
        """Write the probe as ``.safetensors`` (see the module docstring); returns ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"probes are saved as safetensors; name the file *.safetensors, not {path.name}")
        metadata = {FORMAT_KEY: PROBE_FORMAT, CLASSNAMES_KEY: json.dumps(list(self.classnames)), L2_KEY: repr(self.l2)}
        if self.model_sha256 is not None:
            metadata[SHA_KEY] = self.model_sha256
        tensors = {"weight": self.weight.detach().float().contiguous(), "bias": self.bias.detach().float().contiguous()}
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            save_file(tensors, str(partial), metadata=metadata)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path


@dataclass(frozen=True)
class ProbeFit:
    """A probe plus how it was chosen: its accuracy on the data it was refit on and on the validation split."""

    probe: LinearProbe
    train_accuracy: float
    val_accuracy: float | None  # of the chosen l2, fit without the validation split; None if there was none
    val_accuracy_by_l2: dict[float, float] = field(default_factory=dict)


def load_probe(path: str | Path, model: torch.nn.Module | None = None) -> LinearProbe:
    """Read a probe written by :meth:`LinearProbe.save`.

    With ``model``, its weights fingerprint must match the one the probe records (ProbeError otherwise).
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            weight, bias = handle.get_tensor("weight"), handle.get_tensor("bias")
        classnames = tuple(json.loads(metadata[CLASSNAMES_KEY]))
    except Exception as exc:  # safetensors raises its own error types; missing keys and bad JSON land here too
        raise ProbeError(f"cannot read linear probe {path}: {exc}") from exc
    if metadata.get(FORMAT_KEY) != PROBE_FORMAT:
        raise ProbeError(f"{path} is not a linear probe ({FORMAT_KEY}={metadata.get(FORMAT_KEY)!r})")
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or len(classnames) != weight.shape[0]:
        raise ProbeError(
            f"{path}: weight {list(weight.shape)}, bias {list(bias.shape)} and {len(classnames)} classes disagree"
        )
    probe = LinearProbe(weight.float(), bias.float(), classnames, metadata.get(SHA_KEY), float(metadata.get(L2_KEY, 0)))
    if model is not None and probe.model_sha256 is not None:
        actual = weights_sha256(model)
        if actual != probe.model_sha256:
            raise ProbeError(
                f"{path} was fit on features of weights {probe.model_sha256[:12]}..., not of this model "
                f"({actual[:12]}...); refit the probe for this model"
            )
    return probe


def predict_images(
    probe: LinearProbe,
    model: ImageTextModel,
    preprocess: Preprocess,
    paths: Sequence[Path],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[str]:
    """Predicted class names of image files, in ``paths`` order."""
    return probe.predict_labels(encode_images(model, preprocess, paths, batch_size))


def fit_logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, max_iterations: int = MAX_ITERATIONS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + ``l2 / 2 * ||W||^2`` by full-batch L-BFGS, from zero weights.

    Args:
        features: [N, D] float (unit rows, as the probe uses them).
        labels: [N] int64 in ``[0, num_classes)``.
    Returns:
        ``(weight [C, D], bias [C])`` float32.
    """
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features [N, D] and labels [N] expected, got {list(features.shape)}, {list(labels.shape)}")
    x = features.detach().float()
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iterations,
        history_size=LBFGS_HISTORY,
        tolerance_grad=GRAD_TOLERANCE,
        tolerance_change=CHANGE_TOLERANCE,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]  # torch stubs leave backward untyped
        return loss

    with torch.enable_grad():
        optimizer.step(closure)  # type: ignore[no-untyped-call]  # one step runs up to max_iter iterations
    return weight.detach(), bias.detach()


def stratified_split(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices of ``labels`` [N] into (kept, held) int64 tensors, ``fraction`` of each class held out.

    Deterministic for a seed. Each class keeps at least one example; a class of one is never held out.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for label in sorted(set(labels.tolist())):
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(round(fraction * len(members)), len(members) - 1)
        held.append(members[:count])
        kept.append(members[count:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def accuracy(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``features`` [N, D] whose predicted class index equals ``labels`` [N]."""
    return (probe.predict(features) == labels).float().mean().item()


def fit_probe(
    features: torch.Tensor,
    labels: Sequence[str],
    *,
    l2_grid: Sequence[float] = L2_GRID,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    model_sha256: str | None = None,
) -> ProbeFit:
    """Choose ``l2`` on a validation split of (``features`` [N, D], ``labels`` N names), then refit on all of it."""
    if features.shape[0] != len(labels) or not labels:
        raise DatasetError(f"need one label per feature row, got {features.shape[0]} rows and {len(labels)} labels")
    classnames = tuple(sorted(set(labels)))
    if len(classnames) < 2:
        raise DatasetError(f"a probe needs at least two classes, got {list(classnames)}")
    if not l2_grid:
        raise ValueError("l2_grid is empty")
    x = F.normalize(features.float(), dim=-1)
    column = {name: c for c, name in enumerate(classnames)}
    y = torch.tensor([column[label] for label in labels])
    fit_rows, val_rows = stratified_split(y, val_fraction, seed)
    scores: dict[float, float] = {}
    if len(val_rows) > 0:
        for l2 in l2_grid:
            weight, bias = fit_logistic_regression(x[fit_rows], y[fit_rows], len(classnames), l2)
            scores[l2] = accuracy(LinearProbe(weight, bias, classnames), x[val_rows], y[val_rows])
            logger.debug("l2=%g: validation accuracy %.4f", l2, scores[l2])
        best = max(scores.values())
        chosen = max(l2 for l2, score in scores.items() if score == best)
    else:
        chosen = DEFAULT_L2
        logger.warning("too few examples per class for a validation split; using l2=%g", chosen)
    weight, bias = fit_logistic_regression(x, y, len(classnames), chosen)
    probe = LinearProbe(weight, bias, classnames, model_sha256, chosen)
    return ProbeFit(probe, accuracy(probe, x, y), scores.get(chosen), scores)


def label_accuracy(probe: LinearProbe, features: torch.Tensor, labels: Sequence[str]) -> float:
    """Fraction of ``labels`` the probe predicts from ``features`` [N, D]; labels it has no class for count wrong."""
    unknown = sorted(set(labels) - set(probe.classnames))
    if unknown:
        logger.warning("%d test labels are not probe classes and count as errors: %s", len(unknown), unknown[:5])
    predicted = probe.predict_labels(features)
    return sum(p == t for p, t in zip(predicted, labels, strict=True)) / len(labels)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--data", type=Path, required=True, help="labelled folder: captions file with labels, or a sub-folder per class"
    )
    parser.add_argument("--captions", type=Path, help="captions file with a label column, if not in the folder")
    parser.add_argument("--test", type=Path, help="labelled test folder (default: hold out --test-fraction of --data)")
    parser.add_argument("--test-fraction", type=_fraction, default=DEFAULT_TEST_FRACTION, help="without --test")
    parser.add_argument("--val-fraction", type=_fraction, default=DEFAULT_VAL_FRACTION, help="of the training data")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation and test splits")
    parser.add_argument(
        "--l2", type=float, nargs="+", default=list(L2_GRID), help="weight-decay strengths to choose from"
    )
    parser.add_argument("--out", type=Path, default=Path("probe.safetensors"), help="where to save the probe")
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="OUT", help="also write the report as JSON to OUT (stdout if no OUT)"
    )


def _read_labelled(root: Path, captions: Path | None = None) -> list[Pair]:
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist")
    return read_labelled(root, captions)


def run(args: argparse.Namespace) -> int:
    train_pairs = _read_labelled(args.data, args.captions)
    test_pairs = _read_labelled(args.test) if args.test is not None else []
    model, preprocess = load(args.model, args.device, arch=args.arch)
    features = encode_images(model, preprocess, [p.image for p in train_pairs], args.batch_size)
    labels = [str(p.label) for p in train_pairs]
    if args.test is not None:
        test_features = encode_images(model, preprocess, [p.image for p in test_pairs], args.batch_size)
        test_labels = [str(p.label) for p in test_pairs]
    else:
        column = {name: c for c, name in enumerate(sorted(set(labels)))}
        kept, held = stratified_split(torch.tensor([column[x] for x in labels]), args.test_fraction, args.seed)
        test_features, test_labels = features[held], [labels[i] for i in held.tolist()]
        features, labels = features[kept], [labels[i] for i in kept.tolist()]
    sha = weights_sha256(model)
    result = fit_probe(
        features, labels, l2_grid=args.l2, val_fraction=args.val_fraction, seed=args.seed + 1, model_sha256=sha
    )
    test_accuracy = label_accuracy(result.probe, test_features, test_labels) if test_labels else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.probe.save(args.out)
    report: dict[str, object] = {
        "model": str(args.model),
        "data": str(args.data),
        "test": str(args.test) if args.test is not None else f"{args.test_fraction:g} of data",
        "classes": list(result.probe.classnames),
        "l2": result.probe.l2,
        "num_train": len(labels),
        "num_test": len(test_labels),
        "train_accuracy": result.train_accuracy,
        "val_accuracy": result.val_accuracy,
        "val_accuracy_by_l2": {f"{l2:g}": score for l2, score in result.val_accuracy_by_l2.items()},
        "test_accuracy": test_accuracy,
        "probe": str(args.out),
    }
    if args.json != "-":
        rows = [
            ("train accuracy", result.train_accuracy),
            ("validation accuracy", result.val_accuracy),
            ("test accuracy", test_accuracy),
        ]
        sys.stdout.write(
            f"linear probe on {args.model} features: {len(result.probe.classnames)} classes, "
            f"{len(labels)} train / {len(test_labels)} test images, l2={result.probe.l2:g}\n"
        )
        sys.stdout.write("".join(f"{name:<20}  {'-' if value is None else f'{value:.4f}'}\n" for name, value in rows))
        sys.stdout.write(f"saved probe to {args.out}\n")
    if args.json is not None:
        write_json(report, args.json)
    return 0
