"""SentencePiece tokenizers of SigLIP, SigLIP 2 and XLM-RoBERTa: the models' own text normalization, ids and
fixed-length rows.

Gives the ids of transformers' tokenizers called with ``padding="max_length", truncation=True,
max_length=context_length`` and right padding, the rows the weights were trained on (big_vision pads on the right):

- ``"siglip"`` (``SiglipTokenizer``; the ``spiece.model`` of SigLIP's English and multilingual vocabularies): "▁"
  becomes a space, then the text is lower-cased (``str.lower``), ASCII punctuation (``string.punctuation``) is
  removed, whitespace runs become one space and the ends are stripped; SentencePiece ids follow, then the end token
  ``</s>``, and rows are padded with ``</s>`` too (big_vision's ``eos="sticky", pad_value=1``).
- ``"siglip2"`` (the Gemma tokenizer of SigLIP 2, ``tokenizer.model``): each character is lower-cased on its own,
  as the ``tokenizers`` Lowercase normalizer does (a final capital sigma becomes "σ"), nothing is removed;
  SentencePiece ids follow, then ``<eos>``, and rows are padded with ``<pad>``.
- ``"xlm-roberta"`` (``XLMRobertaTokenizer``, ``sentencepiece.bpe.model``; OpenCLIP's multilingual text towers):
  the model's own normalization only; ids in fairseq's numbering (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3,
  every other piece one above its SentencePiece id), the row ``<s>``, ids, ``</s>``, padded with ``<pad>``.

A text longer than the row keeps its start and end tokens: its ids are cut to fit, then the end token follows.

Where this differs from the references, on purpose or by choice of reference:

- Text spelling a special token ("</s>", "<eos>", "<pad>") is tokenized as text. transformers maps it to the special
  id, which lets user text forge control tokens; OpenCLIP, which cleans text before its transformers tokenizer,
  does as this module does for SigLIP.
- OpenCLIP's cleaning also fixes mojibake (ftfy), unescapes HTML entities and collapses whitespace (all three
  flavors), turns "_" into a space (SigLIP) and for SigLIP 2 strips punctuation as well; big_vision lower-cases
  ASCII letters only for SigLIP 2. This module follows transformers.

``sentencepiece`` is an optional dependency (the ``siglip`` extra): without it, making a tokenizer raises
:class:`~clip_model.errors.MissingDependencyError` saying how to install it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .config import SentencePieceFlavor
from .errors import MissingDependencyError, TokenizerError
from .tokenizer import pack_rows, preview

SIGLIP_CONTEXT_LENGTH = 64  # tokens per row of most SigLIP and SigLIP 2 models, end token included
SPIECE_UNDERLINE = "\u2581"  # SentencePiece's visible space, which SigLIP's tokenizer reads as a space
INSTALL_HINT = "pip install 'clip-search[siglip]'"
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_WHITESPACE_RUN = re.compile(r"\s+")


def canonicalize(text: str) -> str:
    """SigLIP's text normalization (transformers' ``SiglipTokenizer.canonicalize_text`` after its "▁" rule)."""
    text = text.replace(SPIECE_UNDERLINE, " ").lower().translate(_PUNCTUATION)
    return _WHITESPACE_RUN.sub(" ", text).strip()


def lowercase_chars(text: str) -> str:
    """SigLIP 2's text normalization: every character lower-cased independently of its neighbours."""
    return "".join([char.lower() for char in text])


def unchanged(text: str) -> str:
    """XLM-RoBERTa's normalization before SentencePiece's own: none."""
    return text


@dataclass(frozen=True)
class _Flavor:
    """What differs between the tokenizers: the normalization, the pieces that start, end and pad a row, and
    whether ids are numbered as fairseq numbers them (:data:`FAIRSEQ_SPECIALS`)."""

    normalize: Callable[[str], str]
    end_piece: str
    pad_piece: str
    start_piece: str | None = None
    fairseq: bool = False


FLAVORS: dict[str, _Flavor] = {
    "siglip": _Flavor(canonicalize, end_piece="</s>", pad_piece="</s>"),
    "siglip2": _Flavor(lowercase_chars, end_piece="<eos>", pad_piece="<pad>"),
    "xlm-roberta": _Flavor(unchanged, end_piece="</s>", pad_piece="<pad>", start_piece="<s>", fairseq=True),
}
FAIRSEQ_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}  # fixed ids; other pieces: SentencePiece id + 1
FAIRSEQ_OFFSET = 1
FAIRSEQ_EXTRA_PIECES = 2  # the offset, and <mask> after the last piece


def _sentencepiece() -> Any:
    """The ``sentencepiece`` module, or :class:`MissingDependencyError` naming the extra that installs it."""
    try:
        import sentencepiece
    except ImportError as exc:
        raise MissingDependencyError(
            f"SigLIP's and XLM-RoBERTa's tokenizers need the sentencepiece package, which is not installed: "
            f"{INSTALL_HINT}"
        ) from exc
    return sentencepiece


class SentencePieceTokenizer:
    """A SigLIP (``flavor="siglip"``), SigLIP 2 (``"siglip2"``) or XLM-RoBERTa (``"xlm-roberta"``) tokenizer over
    a SentencePiece model file.

    Stateless after construction; safe to share between threads.
    """

    def __init__(self, model_file: str | Path, flavor: SentencePieceFlavor) -> None:
        """Load ``model_file`` (``spiece.model``, ``tokenizer.model``, ``sentencepiece.bpe.model``). Raises
        :class:`TokenizerError` for an
        unreadable file or one without the flavor's end and pad pieces, :class:`MissingDependencyError` without
        sentencepiece."""
        if flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {', '.join(map(repr, FLAVORS))}, got {flavor!r}")
        processor = _sentencepiece().SentencePieceProcessor()
        try:
            processor.Load(str(model_file))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot read SentencePiece model {model_file}: {exc}") from exc
        self.flavor: SentencePieceFlavor = flavor
        self.model_file = Path(model_file)
        self._processor = processor
        spec = FLAVORS[flavor]
        self._normalize, self._fairseq = spec.normalize, spec.fairseq
        self._unk = int(processor.unk_id())
        if spec.fairseq:
            self._piece_id("<s>"), self._piece_id("</s>")  # the pieces an XLM-RoBERTa model has (raises otherwise)
        numbering = FAIRSEQ_SPECIALS if spec.fairseq else {}
        pieces = [p for p in (spec.end_piece, spec.pad_piece, spec.start_piece) if p is not None]
        ids = {p: numbering[p] if p in numbering else self._piece_id(p) for p in pieces}
        self._end, self._pad = ids[spec.end_piece], ids[spec.pad_piece]
        self._start = ids[spec.start_piece] if spec.start_piece else None

    def _piece_id(self, piece: str) -> int:
        index = int(self._processor.PieceToId(piece))
        if self._processor.IdToPiece(index) != piece:  # unknown pieces map to the unk id
            raise TokenizerError(
                f"SentencePiece model {self.model_file} has no {piece!r} piece ({self.flavor} needs it)"
            )
        return index

    @property
    def eot_token_id(self) -> int:
        return self._end

    @property
    def pad_token_id(self) -> int:
        return self._pad

    @property
    def vocab_size(self) -> int:
        pieces = int(self._processor.GetPieceSize())
        return pieces + FAIRSEQ_EXTRA_PIECES if self._fairseq else pieces

    def normalize(self, text: str) -> str:
        """``text`` as SentencePiece sees it (see the module docstring for the rules)."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        return self._normalize(text)

    def encode(self, text: str) -> list[int]:
        """Ids of the normalized ``text`` (fairseq's numbering for XLM-RoBERTa), without start or end token."""
        ids = [int(i) for i in self._processor.EncodeAsIds(self.normalize(text))]
        if not self._fairseq:
            return ids
        return [FAIRSEQ_SPECIALS["<unk>"] if i == self._unk else i + FAIRSEQ_OFFSET for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; the start, end and pad ids are dropped."""
        size = self.vocab_size
        bad = [int(i) for i in ids if not 0 <= int(i) < size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the vocabulary [0, {size})")
        kept = [int(i) for i in ids if int(i) not in (self._start, self._end, self._pad)]
        if self._fairseq:
            kept = [self._unk if i == FAIRSEQ_SPECIALS["<unk>"] else i - FAIRSEQ_OFFSET for i in kept]
        return str(self._processor.DecodeIds(kept))

    def __call__(
        self, texts: str | Sequence[str], context_length: int = SIGLIP_CONTEXT_LENGTH, truncate: bool = False
    ) -> torch.Tensor:
        """int64 tensor ``[len(texts), context_length]``; each row is ``[start?, *encode(text), end, pad, ...]``
        (a start token for XLM-RoBERTa only).

        A single string counts as one text. A text that does not fit raises :class:`TokenizerError` unless
        ``truncate`` is true, in which case its ids are cut so that the row still ends with the end token.
        """
        if isinstance(texts, str):
            texts = [texts]
        start = [] if self._start is None else [self._start]
        if context_length < len(start) + 1:
            raise TokenizerError(f"context_length must be at least {len(start) + 1}, got {context_length}")
        max_ids = context_length - len(start) - 1
        rows: list[list[int]] = []
        for index, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > max_ids:
                if not truncate:
                    raise TokenizerError(
                        f"text {index} ({preview(text)}) has {len(ids) + len(start) + 1} tokens with the special "
                        f"tokens, more than context_length={context_length}; pass truncate=True to cut it to fit"
                    )
                ids = ids[:max_ids]
            rows.append([*start, *ids, self._end])
        return pack_rows(rows, context_length, self._pad)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.model_file)!r}, flavor={self.flavor!r})"


@lru_cache(maxsize=8)
def load_sentencepiece(model_file: Path, flavor: SentencePieceFlavor) -> SentencePieceTokenizer:
    """A shared :class:`SentencePieceTokenizer` per (file, flavor), read once."""
    return SentencePieceTokenizer(model_file, flavor)
