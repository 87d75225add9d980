"""Texts -> token rows for every model family, with text longer than the context truncated or chunked.

The indexer and the server turn texts into embeddings through this module, so each family's rule lives in one place:

- :meth:`TextInput.of` ``(model)``: the model's tokenizer (:func:`clip_model.tokenizer_for`), its context length and
  the frame of its rows, ``[start?, *ids, end, pad, ...]``, read from the tokenizer's own row of the empty text
  (CLIP: ``<|startoftext|>``, ``<|endoftext|>``, 0; SigLIP: ``</s>`` padded with ``</s>``; SigLIP 2: ``<eos>``,
  ``<pad>``; XLM-RoBERTa: ``<s>``, ``</s>``, ``<pad>``). A row has room for ``capacity`` ids of text.
- :meth:`TextInput.rows` ``(texts, long_text)`` -> :class:`TextRows`. Whether a text was cut is decided from the
  tokenizer's ids (more than ``capacity`` of them), never from the padding, which differs per family.
  ``"truncate"``: one row per text; a longer text keeps its first ``capacity`` ids, the row the tokenizer gives with
  ``truncate=True``. ``"chunk"``: a text that fits gets that same row; a longer one gets one row per window of
  :func:`chunk_windows`, in the same tensor, so a whole batch is encoded in one call.
- :meth:`TextRows.pool`: one unit vector per text from its rows' unit features: a one-row text's feature unchanged (a
  text that fits embeds exactly as it does without chunking), a chunked text's windows averaged, then renormalized.
- :func:`encode_texts`: rows, :func:`clip_model.trim_for`, ``encode_text`` and pooling, for one model.

A chunked text's ids are its words' ids (:func:`split_words`: a run of non-whitespace with the whitespace before
it), each word tokenized on its own. Tokenizers whose pieces never span whitespace (CLIP's, SigLIP's, SigLIP 2's
and XLM-RoBERTa's) give the same ids for the whole text, so the windows hold exactly the text's tokens.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from .errors import TokenizerError
from .factory import TextTokenizer, tokenizer_for, trim_for
from .model import ImageTextModel
from .tokenizer import pack_rows

LongText = Literal["truncate", "chunk"]  # what happens to a text longer than the model's context
LONG_TEXT_MODES: tuple[LongText, ...] = get_args(LongText)
DEFAULT_LONG_TEXT: LongText = "truncate"  # the indexer's and the server's rule unless told otherwise
DEFAULT_OVERLAP_FRACTION = 0.25  # of a window's capacity: the ids consecutive windows share at most, by default
FRAME_PROBE_LENGTH = 3  # a row long enough to show the start token (if any), the end token and one pad
_WORD = re.compile(r"\s*\S+")  # a word with the whitespace before it


def split_words(text: str) -> list[str]:
    """``text`` cut before each whitespace run that precedes a word: words with the whitespace before them (the first
    also keeps what leads the text, the last what trails it). They join back to ``text``."""
    starts = [match.start() for match in _WORD.finditer(text)][1:]
    return [text[start:stop] for start, stop in zip([0, *starts], [*starts, len(text)], strict=True)]


def chunk_windows(word_lengths: Sequence[int], capacity: int, overlap: int) -> list[tuple[int, int]]:
    """Windows ``[start, stop)`` over the ids of words of ``word_lengths`` ids each (laid end to end), in order.

    - Every id is in a window and no window holds more than ``capacity`` ids; starts and stops increase strictly.
    - Windows start and stop only where a word starts (or at the end), so no word is cut, except a word longer than
      ``capacity``: its ids are cut wherever they must be.
    - Each window stops as late as it can. The next one starts at the first cut point at or after ``overlap`` ids
      before that stop, so consecutive windows share at most ``overlap`` ids; when that window would add nothing
      (the next word does not fit beside the shared ids) it starts at the stop instead, sharing none. The last
      window is the exception: it starts at the earliest cut point from which the rest of the text fits, so it is
      as full as the others (it may share more).
    - No ids at all: one empty window ``[(0, 0)]``.

    Raises ValueError for ``capacity`` < 1, an ``overlap`` outside ``[0, capacity)`` or a negative word length.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    if not 0 <= overlap < capacity:
        raise ValueError(f"overlap must be in [0, {capacity}) for a capacity of {capacity}, got {overlap}")
    if any(n < 0 for n in word_lengths):
        raise ValueError("word lengths must not be negative")
    cuts, total = _cut_points(word_lengths, capacity), sum(word_lengths)
    windows, start = [], 0
    while total - start > capacity:
        stop = cuts[bisect_right(cuts, start + capacity) - 1]  # the last cut point the window can reach
        windows.append((start, stop))
        following = cuts[bisect_left(cuts, max(stop - overlap, start + 1))]
        if cuts[bisect_right(cuts, following + capacity) - 1] <= stop:
            following = stop  # sharing ids would leave no room for the next word
        if total - following <= capacity:
            following = cuts[bisect_left(cuts, total - capacity)]  # the last window, as full as it can be
        start = following
    windows.append((start, total))
    return windows


def _cut_points(word_lengths: Sequence[int], capacity: int) -> list[int]:
    """Sorted positions a window may start or stop at: word starts, the end, and every position inside a word
    longer than ``capacity``."""
    cuts, position = {0}, 0
    for length in word_lengths:
        if length > capacity:
            cuts.update(range(position + 1, position + length))
        position += length
        cuts.add(position)
    return sorted(cuts)


@dataclass(frozen=True)
class TextRows:
    """Token rows of a batch of texts: ``tokens`` int64 ``[R, context_length]`` holds each text's rows in text order,
    ``chunks[i]`` rows for text ``i`` (1 unless it was chunked; they sum to R); ``truncated[i]``: text ``i`` had ids
    that no row holds (``"truncate"`` mode only: chunks hold every id)."""

    tokens: torch.Tensor
    chunks: tuple[int, ...]
    truncated: tuple[bool, ...]

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Unit features of the rows ``[R, D]`` -> one unit row per text ``[N, D]``: a one-row text's feature as it
        is, the mean of a chunked text's rows renormalized."""
        if features.shape[0] != sum(self.chunks):
            raise ValueError(f"expected {sum(self.chunks)} rows of features, got {features.shape[0]}")
        if all(n == 1 for n in self.chunks):
            return features
        pooled = [
            rows[0] if len(rows) == 1 else F.normalize(rows.mean(dim=0), dim=-1)
            for rows in torch.split(features, list(self.chunks))
        ]
        return torch.stack(pooled)


class TextInput:
    """A model's text side: its tokenizer, context length and row frame (see the module docstring).

    Stateless after construction; safe to share between threads.
    """

    def __init__(self, tokenizer: TextTokenizer, context_length: int) -> None:
        """Raises :class:`TokenizerError` when the tokenizer's rows are not ``[start?, ids, end, pad, ...]`` or leave
        no room for text in ``context_length`` positions."""
        self.tokenizer = tokenizer
        self.context_length = context_length
        end = tokenizer.eot_token_id
        frame = [int(i) for i in tokenizer([""], context_length=FRAME_PROBE_LENGTH)[0].tolist()]
        self.start: int | None = None if frame[0] == end else frame[0]
        self.end, self.pad = end, frame[-1]
        head = [] if self.start is None else [self.start]
        if frame != [*head, end, *[self.pad] * (FRAME_PROBE_LENGTH - len(head) - 1)]:
            raise TokenizerError(f"{tokenizer!r} writes {frame} for the empty text, not [start?, end, pad, ...]")
        self.capacity = context_length - len(head) - 1
        if self.capacity < 1:
            raise TokenizerError(f"context_length {context_length} leaves no room for text between the special tokens")

    @classmethod
    def of(cls, model: ImageTextModel) -> TextInput:
        """The text side of ``model``; raises what :func:`clip_model.tokenizer_for` raises."""
        return cls(tokenizer_for(model), int(model.context_length))

    def rows(
        self, texts: str | Sequence[str], long_text: LongText = "truncate", overlap: int | None = None
    ) -> TextRows:
        """Token rows of ``texts`` (a single string counts as one text); see the module docstring for the modes.
        ``overlap``: ids consecutive windows of a chunked text share at most (:func:`chunk_windows`); default
        ``DEFAULT_OVERLAP_FRACTION`` of ``capacity``. Raises ValueError for an unknown mode."""
        if long_text not in LONG_TEXT_MODES:
            raise ValueError(f"long_text must be one of {', '.join(map(repr, LONG_TEXT_MODES))}, got {long_text!r}")
        if isinstance(texts, str):
            texts = [texts]
        rows: list[list[int]] = []
        chunks: list[int] = []
        truncated: list[bool] = []
        for text in texts:
            ids = self.tokenizer.encode(text)
            if len(ids) <= self.capacity or long_text == "truncate":
                windows = [ids[: self.capacity]]
            else:
                windows = self.windows(text, overlap)
            rows.extend(self._framed(window) for window in windows)
            chunks.append(len(windows))
            truncated.append(len(ids) > self.capacity and long_text == "truncate")
        return TextRows(pack_rows(rows, self.context_length, self.pad), tuple(chunks), tuple(truncated))

    def windows(self, text: str, overlap: int | None = None) -> list[list[int]]:
        """The ids of ``text``'s words, in the windows :func:`chunk_windows` gives (at most ``capacity`` ids each)."""
        words = [self.tokenizer.encode(word) for word in split_words(text)]
        ids = list(chain.from_iterable(words))
        shared = int(self.capacity * DEFAULT_OVERLAP_FRACTION) if overlap is None else overlap
        return [ids[start:stop] for start, stop in chunk_windows([len(w) for w in words], self.capacity, shared)]

    def _framed(self, ids: list[int]) -> list[int]:
        return [*([] if self.start is None else [self.start]), *ids, self.end]


def encode_texts(
    model: ImageTextModel, texts: Sequence[str], long_text: LongText = "truncate", text_input: TextInput | None = None
) -> tuple[torch.Tensor, TextRows]:
    """``model``'s unit embeddings of ``texts`` ``[N, D]`` and the rows they came from (chunks, truncation).

    The rows are cut by :func:`clip_model.trim_for` and encoded in one ``encode_text`` call; call it under
    ``torch.inference_mode()`` for inference. ``text_input``: ``TextInput.of(model)`` made once by the caller.
    """
    text_input = text_input or TextInput.of(model)
    batch = text_input.rows(texts, long_text)
    features = model.encode_text(trim_for(model, batch.tokens), normalize=True)
    return batch.pool(features), batch
