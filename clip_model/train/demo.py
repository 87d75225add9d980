"""The demo model: a small CLIP trained here, on the synthetic shapes dataset, for offline demos and end-to-end checks.

``clip-train demo`` generates the shapes data (train / test / held-out splits, deterministic from the seed), trains the
demo configuration on the train split and writes ``model.safetensors`` with its evaluation in ``demo.json``. Both
are cached under the output folder: a second call with the same recipe reuses them instead of training again
(nothing is downloaded). The recipe (architecture, steps, data sizes, seed) is hashed into the cache key, so a
changed recipe trains anew.

Evaluation uses attribute queries ("a small red circle"): an image is a hit when its caption for those attributes
matches; recall is reported on the test split (attribute combinations seen in training, new images) and on the
held-out split (colour-shape combinations never seen in training).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..download import default_cache_dir

if TYPE_CHECKING:
    from ..factory import Precision

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the recipe's meaning changes (the hash also covers every field)
# ~5.5 M parameters, most in the token embedding. 64 px input in 16 px patches: 16 tokens instead of 64 with 8 px
# patches, the same recall for a fraction of the training time. GELU: one kernel each way, where QuickGELU is a
# multiply and a sigmoid. 4 vision + 3 text layers: with 3 + 2 the model mistakes the size of a held-out pair
# (a small blue cross read as a large one).
DEMO_ARCHITECTURE: dict[str, Any] = {
    "embed_dim": 96,
    "vision": {"image_size": 64, "layers": 4, "width": 96, "heads": 4, "patch_size": 16, "mlp_width": 384},
    "text": {"width": 96, "heads": 4, "layers": 3},
    "activation": "gelu",
}
QUERY_FIELDS = ("size", "color", "shape")  # the attributes of the evaluation queries


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the demo model."""

    train_images: int = 12_000
    test_images: int = 600
    heldout_images: int = 300
    steps: int = 1_500  # with fewer, the model misses some held-out colour-shape pairs
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.2  # chosen over 0.1, which reached a lower test recall
    warmup_steps: int = 100
    seed: int = 0
    architecture: tuple[tuple[str, Any], ...] = ()  # () = DEMO_ARCHITECTURE

    def key(self) -> str:
        from .synthetic import GENERATOR_VERSION

        payload = {"version": RECIPE_VERSION, "generator": GENERATOR_VERSION, **asdict(self), "arch": self.arch()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def arch(self) -> dict[str, Any]:
        return dict(self.architecture) if self.architecture else DEMO_ARCHITECTURE


def default_demo_dir() -> Path:
    """Where the demo data and model are cached: ``<clip_model cache>/demo``."""
    return default_cache_dir() / "demo"


def demo_paths(out_dir: Path, recipe: Recipe) -> dict[str, Path]:
    """The files of one recipe: data splits, the architecture config, the model and its report."""
    root = out_dir / f"shapes-{recipe.key()}"
    return {
        "root": root,
        "train": root / "data" / "train",
        "test": root / "data" / "test",
        "heldout": root / "data" / "heldout",
        "config": root / "architecture.json",
        "run": root / "run",
        "model": root / "model.safetensors",
        "report": root / "demo.json",
    }


def build_demo(out_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """Generate the data and train the model unless this recipe's model and report exist; returns the report."""
    from . import synthetic

    paths = demo_paths(out_dir, recipe)
    if paths["model"].is_file() and paths["report"].is_file():
        logger.info("reusing the demo model at %s", paths["model"])
        return dict(json.loads(paths["report"].read_text(encoding="utf-8")))
    started = time.monotonic()
    splits: tuple[tuple[Literal["train", "test", "heldout"], int], ...] = (
        ("train", recipe.train_images),
        ("test", recipe.test_images),
        ("heldout", recipe.heldout_images),
    )
    for offset, (split, count) in enumerate(splits):
        size = recipe.arch()["vision"]["image_size"]
        synthetic.generate(paths[split], count, split=split, seed=recipe.seed * 10 + offset, image_size=size)
    paths["config"].write_text(json.dumps(recipe.arch(), indent=2) + "\n", encoding="utf-8")
    train_seconds = _train(paths, recipe)
    report = {
        "recipe": asdict(recipe) | {"architecture": recipe.arch()},
        "model": str(paths["model"]),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "test": evaluate_attributes(paths["model"], paths["test"]),
        "heldout": evaluate_attributes(paths["model"], paths["heldout"]),
    }
    paths["report"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info("demo model in %s: %s", paths["model"], json.dumps({k: report[k] for k in ("test", "heldout")}))
    return report


def _train(paths: dict[str, Path], recipe: Recipe) -> float:
    """Train on the train split (resuming a run that was cut off) and move the model into place; returns seconds."""
    from .fit import FitOptions, fit
    from .state import latest_state

    started = time.monotonic()
    options = FitOptions(
        data=paths["train"],
        model=str(paths["config"]),
        out_dir=paths["run"],
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        warmup_steps=recipe.warmup_steps,
        seed=recipe.seed,
        val_data=paths["test"],
        eval_every=0,
        save_every=max(recipe.steps // 4, 1),
        resume=latest_state(paths["run"] / "checkpoints") is not None,
    )
    result = fit(options)
    result.model_path.replace(paths["model"])
    return time.monotonic() - started


def evaluate_attributes(model_path: Path, split_dir: Path, precision: Precision = "fp32") -> dict[str, float]:
    """Text->image recall@1/5/10 of attribute queries over ``split_dir``: a hit is an image with those attributes.

    ``precision``: as :func:`clip_model.load` (``"int8"`` measures the int8 CPU mode on the same weights)."""
    import clip_model

    from . import synthetic
    from .evaluate import encode_dataset, retrieval_metrics

    model, preprocess = clip_model.load(model_path, precision=precision)
    records = synthetic.load_records(split_dir)
    queries = [synthetic.attribute_query(r, QUERY_FIELDS) for r in records]
    pairs = [replace(pair, caption=query) for pair, query in zip(synthetic.pairs_of(split_dir), queries, strict=True)]
    image_features, text_features, texts = encode_dataset(model, preprocess, pairs)
    metrics = retrieval_metrics(image_features, text_features, queries, texts)
    return {k: round(float(v), 4) for k, v in metrics.items() if k.startswith("text_to_image")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None, help="cache folder (default: <clip_model cache>/demo)")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's optimizer steps")
    parser.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    parser.add_argument("--weight-decay", type=float, default=None, help="override the recipe's AdamW weight decay")
    parser.add_argument("--print-model-path", action="store_true", help="write only the model's path to stdout")


def run(args: argparse.Namespace) -> int:
    import sys

    given = (("steps", args.steps), ("seed", args.seed), ("weight_decay", args.weight_decay))
    recipe = Recipe(**{k: v for k, v in given if v is not None})
    report = build_demo(args.out or default_demo_dir(), recipe)
    if args.print_model_path:
        sys.stdout.write(report["model"] + "\n")
    else:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0
