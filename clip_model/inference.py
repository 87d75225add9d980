"""One way to get a model ready for inference: load, fingerprint, then make the CPU inference copy.

The indexer, the server and the benchmarks all start here, so an index and the server that answers over it always
agree on what "the same model" means: the fingerprint is the sha256 of the float32 weights as loaded, taken before
the inference copy is made, so an index built in fp32 and a server running int8 (or the other way round) share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import weights_sha256
from .factory import PRECISIONS, Precision, load
from .model import ImageTextModel
from .packed import pack_for_cpu
from .preprocess import Preprocess
from .quantize import quantize_int8

INFERENCE_DEVICES = ("cpu",)  # where inference copies can be made


@dataclass(frozen=True)
class InferenceModel:
    """A model ready for inference and what callers record about it.

    ``model`` is in eval mode with gradients off: int8 linear layers for ``precision="int8"``, float32 ones packed
    for oneDNN for ``"fp32"`` (the same results as the plain model, to rounding). ``name`` is the registry name, or
    the checkpoint's absolute path (valid from any working directory). ``weights_sha256`` fingerprints the float32
    weights as loaded.
    """

    model: ImageTextModel
    preprocess: Preprocess
    name: str
    weights_sha256: str
    precision: Precision

    @property
    def embed_dim(self) -> int:
        """Length of the (L2-normalized) embeddings both towers return."""
        return int(self.model.config.embed_dim)

    @property
    def context_length(self) -> int:
        """Tokens per text, end-of-text included."""
        return int(self.model.config.text.context_length)

    def provenance(self) -> dict[str, Any]:
        """What an index records about the embeddings: name, weights fingerprint, dim and preprocessing."""
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "embed_dim": self.embed_dim,
            "image_size": self.preprocess.image_size,
            "mean": self.preprocess.mean,
            "std": self.preprocess.std,
        }


def load_for_inference(
    name_or_path: str | Path, *, arch: str | None = None, precision: Precision = "fp32", device: str = "cpu"
) -> InferenceModel:
    """Load a model (as :func:`clip_model.load` reads it) and make its inference copy.

    Raises ValueError for a precision other than :data:`PRECISIONS` or a device inference copies cannot be made on
    (only the CPU so far), and what :func:`clip_model.load` raises for a model it cannot read.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}; got {precision!r}")
    if torch.device(device).type not in INFERENCE_DEVICES:
        raise ValueError(f"inference runs on the CPU only so far, not on {device!r}")
    model, preprocess = load(name_or_path, arch=arch)
    fingerprint = weights_sha256(model)
    copy = quantize_int8(model) if precision == "int8" else pack_for_cpu(model)
    path = Path(name_or_path).expanduser()
    name = str(path.resolve()) if path.exists() else str(name_or_path)
    return InferenceModel(copy, preprocess, name, fingerprint, precision)
