"""Retrieval recall@k and zero-shot accuracy of any CLIP model on any captioned folder.

Relevance rule: image ``i`` is relevant for text ``t`` exactly when the image's caption equals ``t`` after
:func:`normalize_caption` (whitespace runs collapsed, lower-cased). Each distinct caption is one text query; a caption
shared by several images (an attribute query such as "a small red circle") counts any of those images as a hit.

- ``text_to_image_recall@k``: over the distinct texts that describe at least one image, the fraction whose k most
  similar images include a relevant one. Texts that describe no image only act as distractors for image->text.
- ``image_to_text_recall@k``: over images, the fraction whose k most similar texts include the image's caption.
- ``zero_shot_accuracy_*`` (when every record has a label): top-1 accuracy of the zero-shot classifier over the
  sorted distinct labels, with the 80 ensembled ImageNet prompts, with the single prompt "a photo of a {}." and with
  the bare label.

Similarity is the cosine of unit embeddings (``encode_*(..., normalize=True)``); ties are broken by ``torch.topk``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from ..factory import load, tokenizer_for
from ..model import ImageTextModel
from ..preprocess import Preprocess
from ..zeroshot import build_zero_shot_classifier, prompt_templates
from .data import DatasetError, Pair, read_labelled, read_pairs

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64  # images (and texts) per forward pass
DEFAULT_KS = (1, 5, 10)
SIMILARITY_CHUNK = 1024  # query rows scored per matmul, so N x M similarities never sit in memory at once
ZERO_SHOT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "ensemble80": prompt_templates("imagenet_80"),
    "photo": ("a photo of a {}.",),
    "plain": ("{}",),
}
ZERO_SHOT_DESCRIPTIONS = {
    "ensemble80": "80 ImageNet prompts, ensembled",
    "photo": '"a photo of a {}."',
    "plain": '"{}" (the bare label)',
}


class EncodedDataset(NamedTuple):
    """Embeddings of a dataset: every image once, every distinct (normalized) caption once.

    Unpacks as ``image_features, text_features, texts = encode_dataset(...)``; image ``i``'s caption is
    ``texts[k]`` for the ``k`` with ``texts[k] == normalize_caption(pairs[i].caption)``.
    """

    image_features: torch.Tensor  # [N, D] float32, unit rows, on CPU
    text_features: torch.Tensor  # [M, D] float32, unit rows, on CPU
    texts: list[str]  # the M distinct normalized captions, in order of first appearance


def normalize_caption(text: str) -> str:
    """The form captions are compared in: whitespace runs collapsed to one space, stripped, lower-cased."""
    return " ".join(text.split()).lower()


def _device(model: ImageTextModel) -> torch.device:
    return next(model.parameters()).device


def encode_images(
    model: ImageTextModel, preprocess: Preprocess, paths: Sequence[Path], batch_size: int = DEFAULT_BATCH_SIZE
) -> torch.Tensor:
    """Unit image embeddings of image files: float32 ``[len(paths), embed_dim]`` on CPU, in ``paths`` order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device, chunks = _device(model), []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            pixels = []
            for path in paths[start : start + batch_size]:
                with Image.open(path) as image:
                    pixels.append(preprocess(image))
            batch = torch.stack(pixels).to(device=device, dtype=model.dtype)  # [B, 3, R, R]
            chunks.append(model.encode_image(batch, normalize=True).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim)


def encode_texts(model: ImageTextModel, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """Unit text embeddings: float32 ``[len(texts), embed_dim]`` on CPU; texts longer than the context are cut."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device, chunks, tokenize = _device(model), [], tokenizer_for(model)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            tokens = tokenize(texts[start : start + batch_size], context_length=model.context_length, truncate=True)
            chunks.append(model.encode_text(tokens.to(device), normalize=True).float().cpu())  # [B, D]
    return torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim)


def encode_dataset(
    model: ImageTextModel, preprocess: Preprocess, pairs: Sequence[Pair], batch_size: int = DEFAULT_BATCH_SIZE
) -> EncodedDataset:
    """Encode every image of ``pairs`` and each distinct normalized caption once (see :class:`EncodedDataset`)."""
    if not pairs:
        raise DatasetError("no pairs to encode")
    texts = list(dict.fromkeys(normalize_caption(pair.caption) for pair in pairs))
    image_features = encode_images(model, preprocess, [pair.image for pair in pairs], batch_size)
    return EncodedDataset(image_features, encode_texts(model, texts, batch_size), texts)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    image_captions: Sequence[str],
    texts: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Recall@k in both directions under the module's relevance rule.

    Args:
        image_features: [N, D] float, unit rows.
        text_features: [M, D] float, unit rows; row t embeds ``texts[t]``.
        image_captions: N captions; each must equal (after :func:`normalize_caption`) one of ``texts``.
        texts: M texts, distinct after normalization.
        ks: cut-offs; a k above the number of candidates means all of them (recall 1).
    Returns:
        ``{"text_to_image_recall@k": float, "image_to_text_recall@k": float}`` for each k, values in [0, 1].
    """
    n, m = image_features.shape[0], text_features.shape[0]
    if len(image_captions) != n or len(texts) != m:
        raise ValueError(f"{n} image features for {len(image_captions)} captions, {m} text features for {len(texts)}")
    if n == 0 or m == 0:
        raise ValueError("retrieval needs at least one image and one text")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, got {tuple(ks)}")
    row: dict[str, int] = {}
    for t, text in enumerate(texts):
        if row.setdefault(normalize_caption(text), t) != t:
            raise ValueError(f"texts must be distinct after normalization; {text!r} repeats")
    missing = [c for c in image_captions if normalize_caption(c) not in row]
    if missing:
        raise ValueError(f"{len(missing)} image captions are not among the texts (e.g. {missing[0]!r})")
    text_index = torch.tensor([row[normalize_caption(c)] for c in image_captions], dtype=torch.int64)  # [N]
    images, text_rows = image_features.float(), text_features.float()
    top = max(ks)

    image_hits = []  # per image: is its caption's row among its top-k texts
    for start in range(0, n, SIMILARITY_CHUNK):
        similarity = images[start : start + SIMILARITY_CHUNK] @ text_rows.T  # [chunk, M]
        ranked = similarity.topk(min(top, m), dim=1).indices  # [chunk, k]
        image_hits.append(ranked == text_index[start : start + SIMILARITY_CHUNK, None])  # [chunk, k]
    image_hit = torch.cat(image_hits)  # [N, k] bool

    described = torch.zeros(m, dtype=torch.bool)
    described[text_index] = True
    text_hits = []  # per text: does any of its top-k images carry it as caption
    for start in range(0, m, SIMILARITY_CHUNK):
        similarity = text_rows[start : start + SIMILARITY_CHUNK] @ images.T  # [chunk, N]
        ranked = similarity.topk(min(top, n), dim=1).indices  # [chunk, k]
        queries = torch.arange(start, start + similarity.shape[0])[:, None]  # [chunk, 1]
        text_hits.append(text_index[ranked] == queries)  # [chunk, k]
    text_hit = torch.cat(text_hits)[described]  # [M', k] bool, texts that describe some image

    metrics = {}
    for k in ks:
        metrics[f"text_to_image_recall@{k}"] = text_hit[:, :k].any(dim=1).float().mean().item()
    for k in ks:
        metrics[f"image_to_text_recall@{k}"] = image_hit[:, :k].any(dim=1).float().mean().item()
    return metrics


def zero_shot_accuracy(
    model: ImageTextModel,
    preprocess: Preprocess,
    labelled_pairs: Sequence[Pair],
    templates: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    image_features: torch.Tensor | None = None,
) -> float:
    """Top-1 accuracy in [0, 1] of the zero-shot classifier over the sorted distinct labels of ``labelled_pairs``.

    ``templates``: format strings with one ``{}`` (their embeddings are averaged per class).
    ``image_features``: the pairs' unit image embeddings ``[N, D]`` if already computed (skips re-encoding).
    """
    if not labelled_pairs:
        raise DatasetError("no labelled pairs to classify")
    unlabelled = [p.image.name for p in labelled_pairs if p.label is None]
    if unlabelled:
        raise DatasetError(f"zero-shot accuracy needs a label on every record; {unlabelled[0]} has none")
    classnames = sorted({str(p.label) for p in labelled_pairs})
    if image_features is None:
        image_features = encode_images(model, preprocess, [p.image for p in labelled_pairs], batch_size)
    with torch.inference_mode():
        tokenizer = partial(tokenizer_for(model), context_length=model.context_length, truncate=True)
        classifier = build_zero_shot_classifier(model, classnames, templates, tokenize=tokenizer).float().cpu()
    predicted = (image_features.float() @ classifier).argmax(dim=1)  # [N]
    column = {name: c for c, name in enumerate(classnames)}
    truth = torch.tensor([column[str(p.label)] for p in labelled_pairs])
    return (predicted == truth).float().mean().item()


def evaluate(
    model: ImageTextModel,
    preprocess: Preprocess,
    pairs: Sequence[Pair],
    batch_size: int = DEFAULT_BATCH_SIZE,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Every metric of the module docstring: retrieval always, zero-shot when every pair has a label."""
    encoded = encode_dataset(model, preprocess, pairs, batch_size)
    captions = [pair.caption for pair in pairs]
    metrics = retrieval_metrics(encoded.image_features, encoded.text_features, captions, encoded.texts, ks)
    if all(p.label is not None for p in pairs):
        for name, templates in ZERO_SHOT_TEMPLATES.items():
            metrics[f"zero_shot_accuracy_{name}"] = zero_shot_accuracy(
                model, preprocess, pairs, templates, batch_size=batch_size, image_features=encoded.image_features
            )
    else:
        logger.info("some records have no label: zero-shot accuracy is skipped")
    return metrics


def read_eval_pairs(root: Path, captions: Path | None = None) -> list[Pair]:
    """Pairs of a captioned folder (:func:`read_pairs`); failing that, of a one-sub-folder-per-class folder."""
    try:
        return read_pairs(root, captions)
    except DatasetError as first:
        if captions is not None or not Path(root).is_dir():
            raise
        try:
            return read_labelled(root)
        except DatasetError:
            raise first from None


def _label(metric: str) -> str:
    if metric.startswith("zero_shot_accuracy_"):
        return f"zero-shot accuracy, {ZERO_SHOT_DESCRIPTIONS[metric.removeprefix('zero_shot_accuracy_')]}"
    return metric.replace("text_to_image_", "text->image ").replace("image_to_text_", "image->text ")


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as aligned ``name  value`` lines (values with 4 decimals), ending in a newline."""
    labels = {key: _label(key) for key in metrics}
    width = max(len(label) for label in labels.values())
    return "".join(f"{labels[key]:<{width}}  {value:.4f}\n" for key, value in metrics.items())


def write_json(report: dict[str, object], destination: str) -> None:
    """``report`` as indented JSON to the file ``destination``, or to stdout when it is ``"-"``."""
    text = json.dumps(report, indent=2) + "\n"
    if destination == "-":
        sys.stdout.write(text)
    else:
        Path(destination).write_text(text, encoding="utf-8")
        logger.info("wrote %s", destination)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--arch``, ``--batch-size``, ``--device``: shared by ``eval`` and ``probe``."""
    parser.add_argument("--model", required=True, help="pretrained name (e.g. ViT-B-32) or checkpoint path")
    parser.add_argument("--arch", help="architecture config for checkpoints that do not carry one")
    parser.add_argument("--batch-size", type=_positive, default=DEFAULT_BATCH_SIZE, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", type=Path, required=True, help="captioned folder (captions.jsonl/.csv or .txt)")
    parser.add_argument("--captions", type=Path, help="captions file, if not in the folder")
    parser.add_argument(
        "--json", nargs="?", const="-", metavar="OUT", help="also write the report as JSON to OUT (stdout if no OUT)"
    )


def run(args: argparse.Namespace) -> int:
    pairs = read_eval_pairs(args.data, args.captions)
    model, preprocess = load(args.model, args.device, arch=args.arch)
    metrics = evaluate(model, preprocess, pairs, batch_size=args.batch_size)
    num_texts = len({normalize_caption(p.caption) for p in pairs})
    if args.json != "-":
        sys.stdout.write(f"{args.model} on {args.data}: {len(pairs)} images, {num_texts} distinct captions\n")
        sys.stdout.write(format_table(metrics))
    if args.json is not None:
        report = {
            "model": str(args.model),
            "data": str(args.data),
            "num_images": len(pairs),
            "num_texts": num_texts,
            "metrics": metrics,
        }
        write_json(report, args.json)
    return 0
