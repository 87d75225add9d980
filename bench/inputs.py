"""Inputs that several benchmark members generate: random-weight models saved once per workdir, and synthetic
unit vectors shaped like CLIP embeddings (or uniform on the sphere, the worst case for an approximate index).

CLIP-like vectors (:func:`make_clip_like`, version ``GENERATOR_VERSION``): CLIP embeddings are not uniform on the
sphere; they sit in a narrow cone (mean pairwise cosine ~0.5) with a fast-decaying spectrum and topic clusters.
The generator draws a Gaussian mixture of ``CLUSTERS`` centres with lognormal weights, centres and within-cluster
noise both shaped by a per-axis standard deviation ~ 1/sqrt(1 + j) in a random rotation, adds a shared mean
direction and normalizes: mean pairwise cosine 0.50, nearest-neighbour cosine of a query ~0.87 at 20k vectors,
top 10 of 512 principal axes carry 42% of the variance. Queries are fresh draws from the same mixture.
torch and the project are imported inside the model functions, so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.support import TINY_ARCH

MODEL_ARCH = "ViT-B-32-quickgelu"
GENERATOR_VERSION = 1  # bump when make_clip_like changes: cached vectors of another version are not reused
CLUSTERS = 3000
MEAN_WEIGHT, CENTRE_WEIGHT, NOISE_WEIGHT = 1.0, 0.8, 0.6
SPECTRUM_POWER = 0.5  # per-axis standard deviation ~ (1 + j) ** -SPECTRUM_POWER
GEN_CHUNK = 100_000  # rows generated per matrix product


# ---------------------------------------------------------------------------------------------------------- models


def saved_model(workdir: Path, name: str, make: Callable[[], Any]) -> Path:
    """``workdir/<name>.safetensors``, written from ``make()`` the first time."""
    import clip_model

    path = workdir / f"{name}.safetensors"
    if not path.exists():
        clip_model.save_checkpoint(make().eval(), path)
    return path


def vit_model(workdir: Path) -> Path:
    """ViT-B/32 (quick GELU, OpenAI's) with random weights, seed 0."""
    import clip_model

    return saved_model(workdir, f"{MODEL_ARCH}-seed0", lambda: clip_model.create_model(MODEL_ARCH, seed=0)[0])


def tiny_model(workdir: Path) -> Path:
    """The tests' tiny CLIP (``tests.support.TINY_ARCH``) with random weights, seed 0: the smoke runs' model."""
    import clip_model
    from clip_model.config import CLIPConfig

    return saved_model(
        workdir, "tiny-seed0", lambda: clip_model.create_model(CLIPConfig.from_dict(TINY_ARCH), seed=0)[0]
    )


# --------------------------------------------------------------------------------------------------------- vectors


def make_clip_like(n: int, dim: int, seed: int, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [n, dim], queries [n_queries, dim]) float32 unit rows from the CLIP-like mixture (module doc).

    The mixture (rotation, spectrum, mean, centres, weights) depends on ``dim`` and ``seed`` only; vectors and
    queries are independent draws from it, so a prefix of the vectors is a sample of the same distribution."""
    rng = np.random.default_rng(seed)
    rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    spectrum = (1.0 + np.arange(dim)) ** -SPECTRUM_POWER
    spectrum = (spectrum / np.linalg.norm(spectrum)).astype(np.float32)  # total variance 1
    mean = rng.standard_normal(dim).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centres = (rng.standard_normal((CLUSTERS, dim)).astype(np.float32) * spectrum) @ rotation.T
    weights = rng.lognormal(0.0, 1.0, CLUSTERS)
    weights /= weights.sum()

    def draw(count: int, draw_rng: np.random.Generator) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for start in range(0, count, GEN_CHUNK):
            m = min(GEN_CHUNK, count - start)
            labels = draw_rng.choice(CLUSTERS, size=m, p=weights)
            noise = (draw_rng.standard_normal((m, dim)).astype(np.float32) * spectrum) @ rotation.T
            x = MEAN_WEIGHT * mean + CENTRE_WEIGHT * centres[labels] + NOISE_WEIGHT * noise
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n, np.random.default_rng(seed + 1)), draw(n_queries, np.random.default_rng(seed + 2))


def make_uniform(n: int, dim: int, seed: int, n_queries: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors uniform on the sphere (normalized Gaussians): no structure for an index to exploit."""

    def draw(count: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for start in range(0, count, GEN_CHUNK):
            x = rng.standard_normal((min(GEN_CHUNK, count - start), dim)).astype(np.float32)
            out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n, np.random.default_rng(seed + 1)), draw(n_queries, np.random.default_rng(seed + 2))
