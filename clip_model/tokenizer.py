"""CLIP's byte-level BPE tokenizer: text cleaning, pre-tokenization, BPE merges and fixed-length id tensors.

Produces the same ids as OpenAI's ``SimpleTokenizer`` plus ``clip.tokenize``, so that it works with every
checkpoint trained on them:

1. clean: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse whitespace runs to one space, lower-case;
2. pre-tokenize with a regex into words, runs of punctuation, single digits, contraction suffixes and the two
   literal special tokens;
3. map each word's UTF-8 bytes to printable symbols, mark its last symbol as end of word and apply the ranked
   BPE merges; every resulting symbol is a vocabulary entry.

``tokenize`` wraps every text as ``[start, *ids, end]`` and zero-pads it to ``context_length``; the end token has
the largest id, so each row's argmax is its end-of-text position, and ``trim_tokens`` cuts a batch after the last one.
"""

from __future__ import annotations

import gzip
import html
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from itertools import chain, pairwise
from pathlib import Path

import ftfy
import regex
import torch

from .constants import DEFAULT_CONTEXT_LENGTH, VOCAB_SIZE
from .errors import TokenizerError

__all__ = ["Tokenizer", "clean_text", "get_tokenizer", "tokenize", "trim_tokens"]

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"  # in clip_model/data; see LICENSE-openai-clip.txt there
# The vocabulary file is a version header line, then one merge "left right" per line, most frequent first; it holds
# 262,144 merges. CLIP uses the first 48,894: OpenAI budgeted 49,152 (48 Ki) entries and subtracted the 256 byte
# symbols and the 2 special tokens. The 256 end-of-word variants of the byte symbols come on top of that budget,
# which is why the vocabulary ends up with 49,408 entries (``VOCAB_SIZE``).
NUM_BYTES = 256
NUM_MERGES = 49_152 - NUM_BYTES - 2
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"  # suffix of a word's last symbol; decoding turns it into a space
MIN_CONTEXT_LENGTH = 2  # room for the start and end tokens
WORD_CACHE_SIZE = 1 << 16  # distinct pre-tokenized words whose ids each tokenizer memoises (LRU)
PREVIEW_CHARS = 40  # how much of an offending text an error message quotes

# Pre-tokenization, kept character for character as OpenAI wrote it (including IGNORECASE, which matters for
# characters such as U+017F LATIN SMALL LETTER LONG S that case-fold to ASCII letters). Order matters: special
# tokens first, then contraction suffixes, then letter runs, single digits and runs of everything else that is not
# whitespace, so every non-whitespace character of the cleaned text lands in exactly one pre-token.
_PRE_TOKEN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)
# ``regex``'s ``\s`` (Unicode White_Space), which differs from ``str.split`` on e.g. U+001C..U+001F.
_WHITESPACE_RUN = regex.compile(r"\s+")
# Texts made only of these characters skip ftfy and html.unescape because neither can change them: ASCII cannot be
# mojibake, ftfy's other fixes only touch non-ASCII characters, control characters (tab and newline are kept),
# "\r" and HTML entities, and entities need "&". Within this alphabet ``\s`` matches exactly tab, newline and
# space, the characters ``str.split()`` splits on, so ``" ".join(text.split())`` equals strip + collapse + strip.
# tests/clip_model/test_tokenizer.py checks the equivalence on a fuzz corpus.
_FAST_PATH_TEXT = re.compile(r"[\t\n\x20-\x25\x27-\x7e]*")  # \x26 is "&"


def _clean_full(text: str) -> str:
    """OpenAI's cleaning, step by step: ftfy, double HTML unescape, strip, whitespace collapse, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    collapsed: str = _WHITESPACE_RUN.sub(" ", text)  # ``regex`` ships no type information
    return collapsed.strip().lower()


def clean_text(text: str) -> str:
    """``text`` as the tokenizer sees it before pre-tokenization; identical to OpenAI's cleaning for every input."""
    if _FAST_PATH_TEXT.fullmatch(text):
        return " ".join(text.split()).lower()
    return _clean_full(text)


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``(symbol_of_byte, vocab_byte_order)``: the printable stand-in of every byte, and the bytes in id order.

    BPE works on strings, so each byte gets a printable character: bytes that are visible Latin-1 characters stand
    for themselves; the rest (controls, space, no-break space, soft hyphen) take U+0100, U+0101, ... in byte order.
    The vocabulary lists the self-standing bytes first, then the remapped ones.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    visible_set = set(visible)
    remapped = [b for b in range(NUM_BYTES) if b not in visible_set]
    symbols = [chr(b) for b in range(NUM_BYTES)]
    for offset, b in enumerate(remapped):
        symbols[b] = chr(NUM_BYTES + offset)
    return tuple(symbols), (*visible, *remapped)


def _read_merges(vocab_path: Path | None) -> list[tuple[str, str]]:
    """The first ``NUM_MERGES`` merges of a gzipped vocabulary file (default: the packaged one), best first."""
    try:
        if vocab_path is None:
            data = resources.files(__package__).joinpath("data", VOCAB_FILE).read_bytes()
        else:
            data = Path(vocab_path).read_bytes()
        lines = gzip.decompress(data).decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"cannot read BPE vocabulary {vocab_path or VOCAB_FILE}: {exc}") from exc
    merges: list[tuple[str, str]] = []
    for line in lines[1 : NUM_MERGES + 1]:  # line 0 is the version header
        parts = line.split()
        if len(parts) != 2:
            raise TokenizerError(f"malformed BPE merge {line!r} in {vocab_path or VOCAB_FILE}")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise TokenizerError(f"BPE vocabulary {vocab_path or VOCAB_FILE} has {len(merges)} merges, need {NUM_MERGES}")
    return merges


def preview(text: str) -> str:
    """Quoted start of ``text`` for error messages, with "..." when cut."""
    return repr(text[:PREVIEW_CHARS]) + ("..." if len(text) > PREVIEW_CHARS else "")


class Tokenizer:
    """CLIP's BPE tokenizer. Instances are immutable apart from a bounded, thread-safe per-word id cache."""

    def __init__(self, vocab_path: Path | None = None) -> None:
        """Load the merges from ``vocab_path`` (a gzipped BPE file; default: the one shipped with clip_model)."""
        merges = _read_merges(vocab_path)
        symbol_of_byte, byte_order = _byte_symbols()
        base = [symbol_of_byte[b] for b in byte_order]
        vocab = [*base, *(s + END_OF_WORD for s in base), *(a + b for a, b in merges), START_OF_TEXT, END_OF_TEXT]
        self._token_id = {token: i for i, token in enumerate(vocab)}
        if len(vocab) != VOCAB_SIZE or len(self._token_id) != VOCAB_SIZE:
            raise TokenizerError(f"BPE vocabulary has {len(self._token_id)} distinct entries, expected {VOCAB_SIZE}")
        self._merge_rank = {pair: rank for rank, pair in enumerate(merges)}
        self._symbol_of_byte = symbol_of_byte
        byte_of_symbol = {s: b for b, s in enumerate(symbol_of_byte)}
        # Special tokens and END_OF_WORD are printable ASCII, whose symbols are the characters themselves.
        self._token_bytes = [bytes(byte_of_symbol[c] for c in token) for token in vocab]
        self._sot = self._token_id[START_OF_TEXT]
        self._eot = self._token_id[END_OF_TEXT]
        self._word_ids = lru_cache(maxsize=WORD_CACHE_SIZE)(self._compute_word_ids)

    @property
    def sot_token_id(self) -> int:
        return self._sot

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    def _bpe(self, word: str) -> list[str]:
        """Merge the symbols of ``word`` (already byte-mapped), always applying the best-ranked adjacent pair."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        ranks = self._merge_rank
        while len(symbols) > 1:
            best = min(pairwise(symbols), key=lambda pair: ranks.get(pair, NUM_MERGES))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if symbols[i] == first and i + 1 < len(symbols) and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _compute_word_ids(self, word: str) -> tuple[int, ...]:
        if word == START_OF_TEXT or word == END_OF_TEXT:
            return (self._token_id[word],)
        symbols = "".join([self._symbol_of_byte[b] for b in word.encode("utf-8")])
        return tuple([self._token_id[s] for s in self._bpe(symbols)])

    def encode(self, text: str) -> list[int]:
        """BPE ids of the cleaned ``text``, without start or end token. Literal special-token strings map to them."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        ids: list[int] = []
        for word in _PRE_TOKEN.findall(clean_text(text)):
            ids.extend(self._word_ids(word))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: each word is followed by a space; invalid UTF-8 becomes U+FFFD."""
        token_bytes = self._token_bytes
        chunks = []
        for token in ids:
            index = int(token)
            if not 0 <= index < len(token_bytes):
                raise TokenizerError(f"token id {index} is outside the vocabulary [0, {len(token_bytes)})")
            chunks.append(token_bytes[index])
        return b"".join(chunks).decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(
        self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
    ) -> torch.Tensor:
        """int64 tensor ``[len(texts), context_length]``; each row is ``[sot, *encode(text), eot, 0, ...]``.

        A single string counts as one text. A text that does not fit raises :class:`TokenizerError` unless
        ``truncate`` is true, in which case its ids are cut so that the row still ends with the end token.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < MIN_CONTEXT_LENGTH:
            raise TokenizerError(f"context_length must be at least {MIN_CONTEXT_LENGTH}, got {context_length}")
        max_ids = context_length - 2
        rows: list[list[int]] = []
        for index, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > max_ids:
                if not truncate:
                    raise TokenizerError(
                        f"text {index} ({preview(text)}) has {len(ids) + 2} tokens with the start and end tokens, "
                        f"more than context_length={context_length}; pass truncate=True to cut it to fit"
                    )
                ids = ids[:max_ids]
            rows.append([self._sot, *ids, self._eot])
        return pack_rows(rows, context_length)


def pack_rows(rows: list[list[int]], context_length: int, pad_id: int = 0) -> torch.Tensor:
    """Rows of at most ``context_length`` ids, left-aligned and padded with ``pad_id`` into one int64 tensor."""
    out = torch.full((len(rows), context_length), pad_id, dtype=torch.int64)
    if rows:
        lengths = torch.tensor([len(row) for row in rows], dtype=torch.int64)
        filled = torch.arange(context_length) < lengths[:, None]
        out[filled] = torch.tensor(list(chain.from_iterable(rows)), dtype=torch.int64)
    return out


@lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The shared tokenizer over the packaged vocabulary, loaded on first use."""
    return Tokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
) -> torch.Tensor:
    """Tokenize with the shared tokenizer; see :meth:`Tokenizer.__call__`."""
    return get_tokenizer()(texts, context_length=context_length, truncate=truncate)


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens [B, L]`` cut to ``[B, l]``, ``l`` = the last end-of-text position in the batch + 1.

    The causal mask makes each row's end-of-text feature independent of the padding after it, so the cut batch
    encodes to the same features in less time.
    """
    return tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
