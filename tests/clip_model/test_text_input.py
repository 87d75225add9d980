"""clip_model.text_input: rows for every family's tokenizer, truncation read from the ids, and chunk windows."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import clip_model
from clip_model.config import CLIPConfig
from clip_model.text_input import DEFAULT_OVERLAP_FRACTION, TextInput, chunk_windows, split_words
from clip_model.tokenizer_sentencepiece import SentencePieceTokenizer
from tests.clip_model.sentencepiece_models import WORDS, train_gemma_model, train_siglip_model, train_xlm_roberta_model
from tests.support import TINY_ARCH

CONTEXT = 16  # short rows, so that ordinary sentences need several windows
LONG = "a photo of the cat on the beach running " * 6 + "über straße 東京 don't it's résumé " * 3
SEPARATORS = (" ", "  ", "\n", " \t ")


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, clip_model.TextTokenizer]:
    base = tmp_path_factory.mktemp("vocabularies")
    return {
        "clip": clip_model.get_tokenizer(),
        "siglip": SentencePieceTokenizer(train_siglip_model(base / "siglip"), "siglip"),
        "siglip2": SentencePieceTokenizer(train_gemma_model(base / "siglip2"), "siglip2"),
        "xlm-roberta": SentencePieceTokenizer(train_xlm_roberta_model(base / "xlmr"), "xlm-roberta"),
    }


FAMILIES = ("clip", "siglip", "siglip2", "xlm-roberta")


def random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [*WORDS, "Hello,", "World!", "a--b", "x.y", "ÉCOLE", "İstanbul"]
    return [
        " " * rng.randint(0, 1) + "".join(rng.choice(words) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 40)))
        for _ in range(count)
    ]


def check_windows(lengths: list[int], capacity: int, overlap: int) -> list[tuple[int, int]]:
    """The documented properties of chunk_windows, asserted; returns the windows."""
    windows = chunk_windows(lengths, capacity, overlap)
    total = sum(lengths)
    if total == 0:
        assert windows == [(0, 0)]
        return windows
    starts = {0}
    for n in lengths:
        starts.add(max(starts) + n)
    long_insides: set[int] = set()
    position = 0
    for n in lengths:
        if n > capacity:
            long_insides.update(range(position + 1, position + n))
        position += n
    assert windows[0][0] == 0 and windows[-1][1] == total
    for (start, stop), (next_start, next_stop) in zip(windows, windows[1:], strict=False):
        assert start < next_start <= stop < next_stop  # progress, and no id left between them
    for number, (start, stop) in enumerate(windows):
        assert 0 < stop - start <= capacity
        assert {start, stop} <= starts | long_insides  # words are cut only when longer than a window
        if number < len(windows) - 2:
            assert stop - windows[number + 1][0] <= overlap
    if len(windows) > 1:  # the last window starts at the earliest cut point from which the rest fits
        earlier = [c for c in starts | long_insides if total - capacity <= c < windows[-1][0]]
        assert not earlier
    return windows


def test_windows_of_equal_words_share_whole_words_up_to_the_overlap() -> None:
    windows = check_windows([3] * 10, capacity=8, overlap=3)
    assert windows == [(0, 6), (3, 9), (6, 12), (9, 15), (12, 18), (15, 21), (18, 24), (21, 27), (24, 30)]


def test_windows_without_overlap_follow_each_other() -> None:
    assert check_windows([2, 5, 1, 4, 3, 6], capacity=7, overlap=0) == [(0, 7), (7, 12), (12, 15), (15, 21)]


@pytest.mark.parametrize("seed", range(40))
def test_random_word_lengths_give_windows_with_every_documented_property(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.randint(1, 20)
    lengths = [rng.choice([0, 1, 1, 2, 3, 5, capacity, capacity + 3]) for _ in range(rng.randint(1, 60))]
    check_windows(lengths, capacity, rng.randint(0, capacity - 1))


def test_a_single_word_longer_than_a_window_is_cut_inside_with_the_overlap() -> None:
    assert check_windows([20], capacity=8, overlap=2) == [(0, 8), (6, 14), (12, 20)]
    assert check_windows([1, 20, 1], capacity=8, overlap=2) == [(0, 8), (6, 14), (12, 20), (14, 22)]


def test_a_word_that_would_not_fit_beside_the_shared_ids_gets_a_window_without_overlap() -> None:
    # after (0, 6) the overlap would restart at 3, where the 7-id word cannot join: the next window starts at 6
    assert check_windows([3, 3, 7, 3, 3, 3, 3], capacity=8, overlap=3) == [
        (0, 6),
        (6, 13),
        (13, 19),
        (16, 22),
        (19, 25),
    ]


def test_no_ids_is_one_empty_window_and_bad_arguments_are_refused() -> None:
    assert chunk_windows([], 4, 1) == [(0, 0)]
    with pytest.raises(ValueError, match="capacity"):
        chunk_windows([1], 0, 0)
    with pytest.raises(ValueError, match="overlap"):
        chunk_windows([1], 4, 4)
    with pytest.raises(ValueError, match="negative"):
        chunk_windows([1, -1], 4, 1)


@pytest.mark.parametrize("text", ["", "   ", "one", " lead and trail  ", "a\n\nb\tc", "x  y z "])
def test_split_words_joins_back_to_the_text(text: str) -> None:
    words = split_words(text)
    assert "".join(words) == text
    assert all(word.strip() for word in words[1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_are_the_tokenizers_own_and_truncation_is_read_from_the_ids(
    family: str, tokenizers: dict[str, clip_model.TextTokenizer]
) -> None:
    tokenizer = tokenizers[family]
    text_input = TextInput(tokenizer, CONTEXT)
    texts = random_texts(60, seed=1)
    batch = text_input.rows(texts)
    assert batch.tokens.equal(tokenizer(texts, context_length=CONTEXT, truncate=True))
    assert batch.chunks == (1,) * len(texts)
    assert batch.truncated == tuple(len(tokenizer.encode(t)) > text_input.capacity for t in texts)
    assert any(batch.truncated) and not all(batch.truncated)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_text_of_exactly_the_capacity_is_not_truncated_and_one_id_more_is(
    family: str, tokenizers: dict[str, clip_model.TextTokenizer]
) -> None:
    tokenizer = tokenizers[family]
    text_input = TextInput(tokenizer, CONTEXT)
    fits = "a"
    while len(tokenizer.encode(fits)) < text_input.capacity:  # grow it by the word that adds the fewest ids
        fits = min((f"{fits} {word}" for word in WORDS), key=lambda text: len(tokenizer.encode(text)))
    over = f"{fits} cat"
    assert len(tokenizer.encode(fits)) == text_input.capacity < len(tokenizer.encode(over))
    assert text_input.rows([fits, over]).truncated == (False, True)
    assert text_input.rows([fits, over], "chunk").chunks == (1, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_rows_hold_every_id_of_a_long_text_in_framed_windows(
    family: str, tokenizers: dict[str, clip_model.TextTokenizer]
) -> None:
    tokenizer = tokenizers[family]
    text_input = TextInput(tokenizer, CONTEXT)
    for text in [LONG, *random_texts(30, seed=2)]:
        ids = tokenizer.encode(text)
        assert [i for word in split_words(text) for i in tokenizer.encode(word)] == ids  # pieces never span spaces
        batch = text_input.rows([text, "a cat"], "chunk")
        windows = text_input.windows(text)
        assert batch.chunks == (len(windows), 1) and batch.truncated == (False, False)
        assert batch.tokens[-1].equal(tokenizer(["a cat"], context_length=CONTEXT)[0])
        for row, window in zip(batch.tokens, windows, strict=False):  # each window framed as the tokenizer frames
            expected = [*([] if text_input.start is None else [text_input.start]), *window, text_input.end]
            assert row[: len(expected)].tolist() == expected
            assert (row[len(expected) :] == text_input.pad).all()
        lengths = [len(tokenizer.encode(word)) for word in split_words(text)]
        spans = chunk_windows(lengths, text_input.capacity, int(text_input.capacity * DEFAULT_OVERLAP_FRACTION))
        assert [ids[start:stop] for start, stop in spans] == windows
        assert {i for start, stop in spans for i in range(start, stop)} == set(range(len(ids)))
        assert (len(windows) > 1) == (len(ids) > text_input.capacity)


def test_unknown_mode_and_a_context_with_no_room_are_refused(tokenizers: dict[str, clip_model.TextTokenizer]) -> None:
    with pytest.raises(ValueError, match="long_text must be one of 'truncate', 'chunk'"):
        TextInput(tokenizers["clip"], CONTEXT).rows(["a"], "split")  # type: ignore[arg-type]  # the invalid mode
    with pytest.raises(clip_model.TokenizerError, match="no room"):
        TextInput(tokenizers["xlm-roberta"], 2)


def test_pool_keeps_one_row_texts_bit_for_bit_and_averages_chunks() -> None:
    features = F.normalize(torch.randn(5, 8), dim=-1)
    batch = clip_model.TextRows(torch.zeros(5, 4, dtype=torch.long), (1, 3, 1), (False, False, False))
    pooled = batch.pool(features)
    assert pooled[0].equal(features[0]) and pooled[2].equal(features[4])
    torch.testing.assert_close(pooled[1], F.normalize(features[1:4].mean(dim=0), dim=-1), rtol=0, atol=0)
    single = clip_model.TextRows(torch.zeros(2, 4, dtype=torch.long), (1, 1), (False, True))
    assert single.pool(features[:2]).equal(features[:2])
    with pytest.raises(ValueError, match="expected 5 rows"):
        batch.pool(features[:4])


def test_encode_texts_embeds_fitting_texts_as_before_and_long_ones_as_their_windows_mean() -> None:
    model, _ = clip_model.create_model(CLIPConfig.from_dict(TINY_ARCH), seed=0)
    model.eval()
    short = ["a photo of a cat", "red"]
    with torch.inference_mode():
        before = model.encode_text(clip_model.trim_tokens(clip_model.tokenize(short)), normalize=True)
        truncated, _ = clip_model.encode_texts(model, short)
        chunked, rows = clip_model.encode_texts(model, short, "chunk")
        assert truncated.equal(before) and chunked.equal(before) and rows.chunks == (1, 1)
        long_text = "a photo of a dog running on the beach at dusk " * 20
        vector, rows = clip_model.encode_texts(model, [long_text], "chunk")
        text_input = TextInput.of(model)
        windows = model.encode_text(text_input.rows([long_text], "chunk").tokens, normalize=True)
    assert rows.chunks[0] == len(text_input.windows(long_text)) > 1
    torch.testing.assert_close(vector[0], F.normalize(windows.mean(dim=0), dim=-1), rtol=0, atol=1e-5)
    assert abs(vector[0].norm().item() - 1) < 1e-6


def test_model_vocabulary_path_is_used(tmp_path: Path) -> None:
    """TextInput.of(model) of a SigLIP reads the vocabulary beside its weights (tokenizer_for), frame included."""
    vocabulary = train_siglip_model(tmp_path / "train")
    config = clip_model.SigLIPConfig(
        embed_dim=64,
        vision=clip_model.config.VisionConfig(image_size=32, layers=1, width=64, heads=4, patch_size=8),
        text=clip_model.config.TextConfig(width=32, heads=4, layers=1, context_length=CONTEXT, vocab_size=300),
        tokenizer="siglip",
    )
    model, _ = clip_model.create_model(config, seed=0)
    with pytest.raises(clip_model.TokenizerError, match="no SentencePiece vocabulary"):
        TextInput.of(model)
    model.tokenizer_path = vocabulary
    text_input = TextInput.of(model)
    assert (text_input.start, text_input.end, text_input.pad, text_input.capacity) == (None, 1, 1, CONTEXT - 1)


def test_trimmed_xlm_roberta_rows_encode_as_the_full_rows_and_siglip_rows_are_never_trimmed(
    tokenizers: dict[str, clip_model.TextTokenizer],
) -> None:
    """trim_for may cut XLM-RoBERTa's rows (padding is masked out of attention, positions and the mean) but not
    SigLIP's (its last position, padding included, is the feature)."""
    vision = clip_model.config.VisionConfig(image_size=32, layers=1, width=64, heads=4, patch_size=8)
    text = clip_model.config.XLMRobertaTextConfig(width=32, heads=4, layers=2, mlp_width=64, vocab_size=302,
                                                  context_length=CONTEXT, max_positions=CONTEXT + 4)  # fmt: skip
    model, _ = clip_model.create_model(clip_model.XLMRobertaCLIPConfig(32, vision, text), seed=0)
    model.eval()
    short = TextInput(tokenizers["xlm-roberta"], CONTEXT).rows(["a cat", "über straße 東京", "don't"]).tokens
    assert clip_model.trim_for(model, short).shape[1] < CONTEXT
    with torch.inference_mode():
        full = model.encode_text(short, normalize=True)
        trimmed = model.encode_text(clip_model.trim_for(model, short), normalize=True)
    assert (full - trimmed).abs().max().item() <= 1e-6
    siglip_config = clip_model.SigLIPConfig(
        64, vision, clip_model.config.TextConfig(width=32, heads=4, layers=1, context_length=CONTEXT, vocab_size=300),
        tokenizer="siglip",
    )  # fmt: skip
    siglip, _ = clip_model.create_model(siglip_config, seed=0)
    siglip_rows = TextInput(tokenizers["siglip"], CONTEXT).rows(["a cat"]).tokens
    assert clip_model.trim_for(siglip, siglip_rows) is siglip_rows
