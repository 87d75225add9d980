"""Registry of published CLIP weights, read lazily from ``clip_model/data/pretrained.json``.

Canonical names are ``"<arch>/<tag>"`` (``"ViT-B-32/openai"``, ``"ViT-B-32/laion2b_s34b_b79k"``). Aliases cover
OpenAI's own names (``"ViT-B/32"``, ``"ViT-L/14@336px"``) and bare architecture names, which resolve to OpenAI's
weights where OpenAI published some and to a LAION checkpoint otherwise. Each entry carries the sha256 the download
is verified against; ``sha256`` is ``None`` only for entries whose digest could not be confirmed, and
:mod:`clip_model.download` refuses those unless the caller supplies a digest or opts in explicitly.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

from .errors import UnknownModelError

logger = logging.getLogger(__name__)

REGISTRY_RESOURCE = "data/pretrained.json"  # inside the clip_model package
WeightsFormat = Literal["torchscript", "state_dict", "safetensors"]
WEIGHTS_FORMATS: frozenset[str] = frozenset({"torchscript", "state_dict", "safetensors"})
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
MAX_SUGGESTIONS = 5
SUGGESTION_CUTOFF = 0.5  # difflib similarity ratio in [0, 1]


@dataclass(frozen=True)
class TokenizerFile:
    """A SigLIP model's SentencePiece vocabulary, published beside its weights; ``sha256`` as for the weights."""

    url: str
    sha256: str | None
    filename: str


@dataclass(frozen=True)
class PretrainedWeights:
    """One downloadable checkpoint: where it lives, its sha256, and how to build and feed the model it fits.

    ``filename`` is the plain file name used in the cache directory; ``config`` names
    ``clip_model/configs/<config>.json``; ``mean``/``std`` are the per-channel RGB statistics for inputs in [0, 1].
    """

    name: str
    url: str
    sha256: str | None
    filename: str
    config: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    format: WeightsFormat
    source: str
    tokenizer: TokenizerFile | None = None  # SigLIP's SentencePiece model; CLIP's BPE vocabulary ships with clip_model

    @property
    def verified(self) -> bool:
        """True when the registry records a sha256 the download can be checked against."""
        return self.sha256 is not None


@dataclass(frozen=True)
class _Registry:
    weights: dict[str, PretrainedWeights]
    aliases: dict[str, str]
    folded: dict[str, str]  # casefolded canonical name or alias -> canonical name


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, int | float) for v in value):
        raise ValueError(f"pretrained registry: {what} must be a list of 3 numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _checked_sha256(raw: dict[str, Any], what: str) -> str | None:
    sha256 = raw.get("sha256")
    if sha256 is not None and (not isinstance(sha256, str) or not SHA256_PATTERN.fullmatch(sha256)):
        raise ValueError(f"pretrained registry: {what}: sha256 must be 64 lowercase hex digits or null")
    return sha256


def _checked_filename(raw: dict[str, Any], what: str) -> str:
    filename = raw["filename"]
    if not filename or "/" in filename or "\\" in filename or filename in {".", ".."}:
        raise ValueError(f"pretrained registry: {what}: filename must be a plain file name, got {filename!r}")
    return str(filename)


def _parse_tokenizer(name: str, raw: dict[str, Any] | None) -> TokenizerFile | None:
    if raw is None:
        return None
    what = f"{name}: tokenizer"
    return TokenizerFile(url=raw["url"], sha256=_checked_sha256(raw, what), filename=_checked_filename(raw, what))


def _parse_entry(name: str, raw: dict[str, Any]) -> PretrainedWeights:
    sha256 = _checked_sha256(raw, name)
    filename = _checked_filename(raw, name)
    if raw["format"] not in WEIGHTS_FORMATS:
        raise ValueError(f"pretrained registry: {name}: unknown format {raw['format']!r}")
    return PretrainedWeights(
        name=name,
        url=raw["url"],
        sha256=sha256,
        filename=filename,
        config=raw["config"],
        mean=_triple(raw["mean"], f"{name}: mean"),
        std=_triple(raw["std"], f"{name}: std"),
        format=raw["format"],
        source=raw["source"],
        tokenizer=_parse_tokenizer(name, raw.get("tokenizer")),
    )


@lru_cache(maxsize=1)
def _registry() -> _Registry:
    """Parse and check the bundled JSON once, on first use."""
    text = resources.files("clip_model").joinpath(REGISTRY_RESOURCE).read_text(encoding="utf-8")
    doc = json.loads(text)
    weights = {name: _parse_entry(name, raw) for name, raw in doc["weights"].items()}
    aliases: dict[str, str] = dict(doc.get("aliases", {}))
    for alias, target in aliases.items():
        if target not in weights:
            raise ValueError(f"pretrained registry: alias {alias!r} points at unknown weights {target!r}")
        if alias in weights:
            raise ValueError(f"pretrained registry: alias {alias!r} shadows a canonical name")
    folded: dict[str, str] = {}
    for key, target in [*((n, n) for n in weights), *aliases.items()]:
        previous = folded.setdefault(key.casefold(), target)
        if previous != target:
            raise ValueError(f"pretrained registry: {key!r} is ambiguous when case is ignored")
    logger.debug("pretrained registry: %d weights, %d aliases", len(weights), len(aliases))
    return _Registry(weights=weights, aliases=aliases, folded=folded)


def list_pretrained() -> list[str]:
    """Canonical ``"<arch>/<tag>"`` names, in registry order."""
    return list(_registry().weights)


def list_aliases() -> dict[str, str]:
    """Alias -> canonical name (a copy)."""
    return dict(_registry().aliases)


def resolve_pretrained(name: str) -> PretrainedWeights | None:
    """The weights a canonical name or alias denotes (exact match first, then ignoring case); ``None`` if unknown."""
    registry = _registry()
    key = name.strip()
    canonical = key if key in registry.weights else registry.aliases.get(key) or registry.folded.get(key.casefold())
    return registry.weights[canonical] if canonical is not None else None


def get_pretrained(name: str) -> PretrainedWeights:
    """Like :func:`resolve_pretrained` but raises :class:`UnknownModelError`, suggesting close names."""
    weights = resolve_pretrained(name)
    if weights is not None:
        return weights
    registry = _registry()
    candidates = [*registry.weights, *registry.aliases]
    close = difflib.get_close_matches(name.strip(), candidates, n=MAX_SUGGESTIONS, cutoff=SUGGESTION_CUTOFF)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(f"Unknown pretrained weights {name!r}.{hint} Known weights: {', '.join(registry.weights)}.")
