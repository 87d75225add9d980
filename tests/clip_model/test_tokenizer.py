"""clip_model.tokenizer against OpenAI's reference SimpleTokenizer (+ clip.tokenize's wrapping), offline."""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from clip_model import tokenizer as tok
from clip_model.errors import TokenizerError
from tests.clip_model import tokenizer_corpus
from tests.reference import load_reference

CONTEXT_LENGTH = 77
SOT, EOT = 49406, 49407
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
FAST_PATH_REJECTS = ["&", "&amp;", "\r", "a\rb", "\x0b", "a\x0cb", "é", "\x00", "\x7f", "\u00a0"]


@pytest.fixture(scope="module")
def ref() -> Any:
    return load_reference("simple_tokenizer").SimpleTokenizer()


@pytest.fixture(scope="module")
def ours() -> tok.Tokenizer:
    return tok.get_tokenizer()


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return tokenizer_corpus.corpus()


def reference_tokenize(
    ref: Any, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False
) -> torch.Tensor:
    """What ``clip.tokenize`` does (its module imports torchvision, so it is restated here from its source)."""
    if isinstance(texts, str):
        texts = [texts]
    sot, eot = ref.encoder["<|startoftext|>"], ref.encoder["<|endoftext|>"]
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = [sot, *ref.encode(text), eot]
        if len(tokens) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            tokens = tokens[:context_length]
            tokens[-1] = eot
        result[i, : len(tokens)] = torch.tensor(tokens)
    return result


def test_reference_module_is_the_openai_one() -> None:
    module = load_reference("simple_tokenizer")
    assert isinstance(module, ModuleType) and hasattr(module, "SimpleTokenizer")


def test_corpus_is_deterministic_and_varied(corpus: list[str]) -> None:
    assert corpus == tokenizer_corpus.corpus()
    assert len(set(corpus)) >= 1_000
    joined = "".join(corpus)
    for needle in ["\u200d", "\U0001f3fd", "猫", "ع", "ח", "ब", "e\u0301", "Ã©", "&amp;amp;", "'ll", "\r\n", "\x1b"]:
        assert needle in joined, needle
    assert "" in corpus and " " in corpus


def test_encode_matches_reference(ref: Any, ours: tok.Tokenizer, corpus: list[str]) -> None:
    mismatches = [(text, ref.encode(text), ours.encode(text)) for text in corpus]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert mismatches == []


def test_prompts_match_reference(ref: Any, ours: tok.Tokenizer) -> None:
    prompts = tokenizer_corpus.photo_prompts(300)
    assert len(set(prompts)) == len(prompts)
    assert torch.equal(ours(prompts), reference_tokenize(ref, prompts))


def test_tokenize_matches_reference_wrapping(ref: Any, ours: tok.Tokenizer, corpus: list[str]) -> None:
    expected = reference_tokenize(ref, corpus, truncate=True)
    actual = ours(corpus, truncate=True)
    assert actual.dtype == torch.int64 and actual.shape == (len(corpus), CONTEXT_LENGTH)
    assert torch.equal(actual, expected)
    fitting = [text for text in corpus if len(ref.encode(text)) + 2 <= CONTEXT_LENGTH]
    assert len(fitting) < len(corpus)  # the corpus has texts on both sides of the limit
    assert torch.equal(tok.tokenize(fitting), reference_tokenize(ref, fitting))


def test_too_long_raises_like_reference(ref: Any, corpus: list[str]) -> None:
    for text in tokenizer_corpus.long_texts():
        fits = len(ref.encode(text)) + 2 <= CONTEXT_LENGTH
        if fits:
            assert torch.equal(tok.tokenize(text), reference_tokenize(ref, text))
            continue
        with pytest.raises(RuntimeError):
            reference_tokenize(ref, text)
        with pytest.raises(TokenizerError):
            tok.tokenize(text)


def test_exact_fit_boundary(ours: tok.Tokenizer) -> None:
    fits, too_long = "word " * (CONTEXT_LENGTH - 2), "word " * (CONTEXT_LENGTH - 1)
    assert len(ours.encode(fits)) == CONTEXT_LENGTH - 2
    row = ours(fits)[0]
    assert row[-1].item() == EOT and row[0].item() == SOT
    with pytest.raises(TokenizerError):
        ours(too_long)


def test_error_message_says_which_text_how_long_and_how_to_fix(ours: tok.Tokenizer) -> None:
    long_text = "Cat " * 100
    with pytest.raises(TokenizerError) as info:
        ours(["a dog", long_text])
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "text 1" in message
    assert repr("Cat " * 10) in message  # the preview (first 40 characters)
    assert "102 tokens" in message  # 100 ids + start + end
    assert "context_length=77" in message
    assert "truncate=True" in message
    assert len(message) < 300  # a preview, not the whole text


def test_truncate_keeps_eot_last(ours: tok.Tokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(200))
    ids = ours.encode(text)
    row = ours(text, truncate=True)[0].tolist()
    assert len(row) == CONTEXT_LENGTH
    assert row[0] == SOT and row[-1] == EOT
    assert row[1:-1] == ids[: CONTEXT_LENGTH - 2]


@pytest.mark.parametrize("context_length", [2, 3, 16, 32, 77, 128])
def test_other_context_lengths(ref: Any, ours: tok.Tokenizer, corpus: list[str], context_length: int) -> None:
    texts = corpus[:200]
    actual = ours(texts, context_length=context_length, truncate=True)
    assert actual.shape == (len(texts), context_length)
    assert torch.equal(actual, reference_tokenize(ref, texts, context_length=context_length, truncate=True))
    short = "a photo of a cat"  # 5 ids
    if context_length >= 7:
        assert ours(short, context_length=context_length)[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    else:
        with pytest.raises(TokenizerError, match=f"context_length={context_length}"):
            ours(short, context_length=context_length)


@pytest.mark.parametrize("context_length", [-1, 0, 1])
def test_context_length_too_small(ours: tok.Tokenizer, context_length: int) -> None:
    with pytest.raises(TokenizerError, match="at least 2"):
        ours("a", context_length=context_length)


def test_shapes_and_dtype(ours: tok.Tokenizer) -> None:
    single = tok.tokenize("a photo of a cat")
    assert single.shape == (1, CONTEXT_LENGTH) and single.dtype == torch.int64
    assert single[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 2368, EOT]
    assert single[0, 7:].eq(0).all()
    assert torch.equal(ours(("a", "b")), ours(["a", "b"]))
    empty = ours([])
    assert empty.shape == (0, CONTEXT_LENGTH) and empty.dtype == torch.int64
    blank = ours(["", "   \t\n"])
    assert blank[:, :2].tolist() == [[SOT, EOT], [SOT, EOT]] and blank[:, 2:].eq(0).all()


def test_trim_tokens_cuts_after_the_last_end_of_text(ours: tok.Tokenizer) -> None:
    tokens = ours(["a photo of a cat", "a", ""])  # ends at 6, 2 and 1
    trimmed = tok.trim_tokens(tokens)
    assert trimmed.shape == (3, 7) and torch.equal(trimmed, tokens[:, :7])
    assert trimmed[0, -1].item() == EOT
    assert tok.trim_tokens(tokens[2:]).tolist() == [[SOT, EOT]]


def test_special_token_ids_and_vocab(ref: Any, ours: tok.Tokenizer) -> None:
    assert ours.sot_token_id == SOT == ref.encoder["<|startoftext|>"]
    assert ours.eot_token_id == EOT == ref.encoder["<|endoftext|>"]
    assert ours.vocab_size == 49_408 == len(ref.encoder)
    assert tok.NUM_MERGES == len(ref.bpe_ranks)
    assert ours.encode("<|startoftext|>x<|endoftext|>") == [SOT, 343, EOT]


def test_decode_matches_reference_and_round_trips(ref: Any, ours: tok.Tokenizer, corpus: list[str]) -> None:
    for text in corpus:
        ids = ours.encode(text)
        decoded = ours.decode(ids)
        assert decoded == ref.decode(ids), text
        if "</w>" in text:
            continue  # a literal end-of-word marker decodes to a space, by design of the format
        # Each pre-token of the cleaned text comes back followed by one space, special tokens without one.
        words = ref.pat.findall(tok.clean_text(text))
        assert decoded == "".join(word if word in SPECIAL_TOKENS else word + " " for word in words), text
        assert decoded.replace(" ", "") == tok.clean_text(text).replace(" ", "")
    assert ours.decode(ours.encode("A Photo of a CAT!")) == "a photo of a cat ! "
    assert ours.decode(torch.tensor([320, 2368])) == "a cat "
    assert ours.decode([]) == ""


def test_decode_of_partial_utf8_replaces(ours: tok.Tokenizer) -> None:
    ids = ours.encode("猫")
    assert len(ids) > 1
    assert "\ufffd" in ours.decode(ids[:1])


@pytest.mark.parametrize("bad_id", [-1, 49_408, 10**9])
def test_decode_rejects_unknown_ids(ours: tok.Tokenizer, bad_id: int) -> None:
    with pytest.raises(TokenizerError, match=str(bad_id)):
        ours.decode([320, bad_id])


def test_clean_text_matches_reference_cleaning(ref: Any, corpus: list[str]) -> None:
    module = load_reference("simple_tokenizer")
    for text in corpus:
        assert tok.clean_text(text) == module.whitespace_clean(module.basic_clean(text)).lower(), text


def test_fast_path_identical_to_full_cleaning_on_ascii_fuzz() -> None:
    texts = tokenizer_corpus.ascii_fuzz_texts()
    eligible = [text for text in texts if tok._FAST_PATH_TEXT.fullmatch(text)]
    assert len(eligible) >= 5_000  # the fuzz exercises the fast path heavily, not by accident
    assert any("\t" in t for t in eligible) and any("\n" in t for t in eligible) and any("<" in t for t in eligible)
    mismatches = [text for text in texts if tok.clean_text(text) != tok._clean_full(text)]
    assert mismatches == []


def test_fast_path_texts_encode_like_reference(ref: Any, ours: tok.Tokenizer) -> None:
    eligible = [text for text in tokenizer_corpus.ascii_fuzz_texts() if tok._FAST_PATH_TEXT.fullmatch(text)]
    mismatches = [text for text in eligible[:1_500] if ours.encode(text) != ref.encode(text)]
    assert mismatches == []


@pytest.mark.parametrize("text", FAST_PATH_REJECTS)
def test_fast_path_rejects_what_ftfy_or_html_may_change(text: str) -> None:
    assert tok._FAST_PATH_TEXT.fullmatch(text) is None
    assert tok.clean_text(text) == tok._clean_full(text)


def test_fast_path_gate_is_needed() -> None:
    # Inputs the gate sends to the full path really are changed by ftfy or html.unescape.
    assert tok._clean_full("&amp;") == "&"
    assert tok._clean_full("a\x0bb") == "ab"  # ftfy drops vertical tab, str.split would split on it
    assert tok._clean_full("caf\u00c3\u00a9") == "café"


def test_encode_rejects_non_str(ours: tok.Tokenizer) -> None:
    with pytest.raises(TypeError, match="bytes"):
        ours.encode(b"a cat")  # type: ignore[arg-type]  # bad on purpose
    with pytest.raises(TypeError):
        ours(["a cat", None])  # type: ignore[list-item]  # bad on purpose


def test_get_tokenizer_is_cached_and_explicit_path_works(ours: tok.Tokenizer) -> None:
    assert tok.get_tokenizer() is ours
    packaged = resources.files("clip_model").joinpath("data", tok.VOCAB_FILE)
    with resources.as_file(packaged) as path:
        explicit = tok.Tokenizer(Path(path))
    assert explicit.encode("a photo of a cat, 2021") == ours.encode("a photo of a cat, 2021")


def test_bad_vocab_files_raise(tmp_path: Path) -> None:
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(TokenizerError, match="malformed|merges"):
        tok.Tokenizer(short)
    not_gzip = tmp_path / "plain.txt.gz"
    not_gzip.write_bytes(b"#version: 0.2\ni n\n")
    with pytest.raises(TokenizerError, match="cannot read"):
        tok.Tokenizer(not_gzip)
    with pytest.raises(TokenizerError, match="cannot read"):
        tok.Tokenizer(tmp_path / "missing.txt.gz")
