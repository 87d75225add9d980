"""SigLIP, SigLIP 2 and XLM-RoBERTa tokenization against transformers' tokenizers, on SentencePiece models trained
here.

transformers is called as its docs say the models were trained: ``padding="max_length", truncation=True``, rows
padded on the right. Its ``SiglipTokenizer`` reads ``spiece.model``; SigLIP 2's tokenizer (``Siglip2Tokenizer``:
Gemma's BPE plus lower-casing) and ``XLMRobertaTokenizer`` are converted by transformers from ``tokenizer.model`` and
``sentencepiece.bpe.model``, the files this module reads.
"""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import pytest
import torch
import transformers

from clip_model.errors import MissingDependencyError, TokenizerError
from clip_model.tokenizer_sentencepiece import SentencePieceTokenizer, canonicalize, lowercase_chars
from tests.clip_model.sentencepiece_models import train_gemma_model, train_siglip_model, train_xlm_roberta_model

CONTEXT = 16
TRICKY = [
    "A photo of a CAT!",
    "  hello,   world  ",
    "",
    "   ",
    "!!!",
    "café über straße",
    "東京の猫",
    "don't stop",
    "a▁b ▁",
    "x" * 100,
    "\t\nnew\nlines\t",
    "a\r\nb",
    "ÀÉÎÕÜ ǅ ǈ",
    "İstanbul",
    "ΟΔΟΣ ΣΑΣ σας",
    "e\u0301 vs é",
    "ﬁne ﬂow ①② Ｆｕｌｌ",
    "a_b-c (d) [e] {f} #g @h",
    "emoji 😀 ok 👍🏽",
    "3.14 and 2024",
    "\u00a0nbsp\u00a0 zero\u200bwidth",
    "\x00null\x7f",
    "ß ẞ kelvin \u212a",
    "the " * 40,
    "über" * 30,
    "Привет, мир! 日本 犬",
]


@pytest.fixture(scope="module")
def siglip_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.PreTrainedTokenizerBase]:
    folder = tmp_path_factory.mktemp("siglip")
    path = train_siglip_model(folder)
    return path, transformers.SiglipTokenizer(vocab_file=str(path))


@pytest.fixture(scope="module")
def gemma_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.PreTrainedTokenizerBase]:
    folder = tmp_path_factory.mktemp("gemma")
    path = train_gemma_model(folder)
    (folder / "tokenizer_config.json").write_text('{"add_bos_token": false, "add_eos_token": true}')
    reference = transformers.Siglip2Tokenizer.from_pretrained(str(folder))
    reference.padding_side = "right"
    return path, reference


@pytest.fixture(scope="module")
def xlmr_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, transformers.PreTrainedTokenizerBase]:
    path = train_xlm_roberta_model(tmp_path_factory.mktemp("xlmr"))
    return path, transformers.XLMRobertaTokenizer.from_pretrained(str(path.parent))


@pytest.fixture
def files(
    request: pytest.FixtureRequest, siglip_files: tuple, gemma_files: tuple, xlmr_files: tuple
) -> tuple[Path, transformers.PreTrainedTokenizerBase]:
    """The (model file, transformers tokenizer) of the ``flavor`` the test is parametrized with."""
    return {"siglip": siglip_files, "siglip2": gemma_files, "xlm-roberta": xlmr_files}[
        request.getfixturevalue("flavor")
    ]


def reference_ids(reference: transformers.PreTrainedTokenizerBase, texts: list[str], length: int) -> torch.Tensor:
    return reference(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids


@pytest.mark.parametrize("flavor", ["siglip", "siglip2", "xlm-roberta"])
def test_ids_and_padding_match_transformers_on_tricky_strings(flavor: str, files: tuple) -> None:
    path, reference = files
    ours = SentencePieceTokenizer(path, flavor)  # type: ignore[arg-type]
    expected = reference_ids(reference, TRICKY, CONTEXT)
    got = ours(TRICKY, context_length=CONTEXT, truncate=True)
    mismatched = [(t, e.tolist(), g.tolist()) for t, e, g in zip(TRICKY, expected, got, strict=True) if not e.equal(g)]
    assert mismatched == []
    assert got.dtype == torch.int64 and got.shape == (len(TRICKY), CONTEXT)


def test_siglip_rows_end_with_the_end_token_and_pad_with_it(siglip_files: tuple) -> None:
    ours = SentencePieceTokenizer(siglip_files[0], "siglip")
    row = ours("a photo of a cat", context_length=CONTEXT)[0].tolist()
    ids = ours.encode("a photo of a cat")
    assert ours.eot_token_id == ours.pad_token_id == 1  # "</s>", big_vision's eos="sticky", pad_value=1
    assert row == [*ids, 1] + [1] * (CONTEXT - len(ids) - 1)


def test_siglip2_rows_end_with_eos_and_pad_with_pad(gemma_files: tuple) -> None:
    ours = SentencePieceTokenizer(gemma_files[0], "siglip2")
    row = ours("a photo of a cat", context_length=CONTEXT)[0].tolist()
    ids = ours.encode("a photo of a cat")
    assert (ours.eot_token_id, ours.pad_token_id) == (1, 0)  # "<eos>", "<pad>"; no "<bos>"
    assert row == [*ids, 1] + [0] * (CONTEXT - len(ids) - 1)


@pytest.mark.parametrize("flavor", ["siglip", "siglip2", "xlm-roberta"])
def test_long_text_keeps_its_end_token_when_cut_and_is_refused_uncut(flavor: str, files: tuple) -> None:
    path, reference = files
    ours = SentencePieceTokenizer(path, flavor)  # type: ignore[arg-type]
    text = "the cat on the beach " * 20
    row = ours(text, context_length=CONTEXT, truncate=True)[0]
    start = [0] if flavor == "xlm-roberta" else []  # XLM-RoBERTa's rows open with <s>
    assert row[-1].item() == ours.eot_token_id
    assert row[:-1].tolist() == start + ours.encode(text)[: CONTEXT - 1 - len(start)]
    assert row.equal(reference_ids(reference, [text], CONTEXT)[0])
    with pytest.raises(TokenizerError, match="truncate=True"):
        ours(text, context_length=CONTEXT)


def test_special_token_spellings_are_text_not_control_tokens(siglip_files: tuple, gemma_files: tuple) -> None:
    """transformers maps "</s>" typed in a text to the end id; here it stays text (as OpenCLIP's cleaning does)."""
    siglip = SentencePieceTokenizer(siglip_files[0], "siglip")
    gemma = SentencePieceTokenizer(gemma_files[0], "siglip2")
    assert siglip.eot_token_id not in siglip.encode("</s> end")
    assert siglip.normalize("</s> end") == "s end"
    assert not {gemma.eot_token_id, gemma.pad_token_id} & set(gemma.encode("<eos> <pad> end"))


def test_xlm_roberta_rows_use_fairseq_numbering(xlmr_files: tuple) -> None:
    ours = SentencePieceTokenizer(xlmr_files[0], "xlm-roberta")
    row = ours("a photo of a cat", context_length=CONTEXT)[0].tolist()
    ids = ours.encode("a photo of a cat")
    assert (ours.eot_token_id, ours.pad_token_id, ours.vocab_size) == (2, 1, xlmr_files[1].vocab_size)
    assert row == [0, *ids, 2] + [1] * (CONTEXT - len(ids) - 2)
    assert ours.decode(row) == "a photo of a cat"


def test_normalizations() -> None:
    assert canonicalize("  A_Photo, of:\tthe▁CAT!  ") == "aphoto of the cat"
    assert lowercase_chars("ΟΔΟΣ, Hello!") == "οδοσ, hello!"  # each character alone: no final sigma


def test_decode_drops_the_end_and_pad_tokens(gemma_files: tuple) -> None:
    ours = SentencePieceTokenizer(gemma_files[0], "siglip2")
    row = ours("a photo of the cat", context_length=CONTEXT)[0].tolist()
    assert ours.decode(row) == "a photo of the cat"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        ours.decode([ours.vocab_size])


def test_a_model_without_the_flavors_special_pieces_is_refused(siglip_files: tuple) -> None:
    with pytest.raises(TokenizerError, match="'<eos>'"):
        SentencePieceTokenizer(siglip_files[0], "siglip2")  # T5-style pieces: "</s>", no "<eos>"


def test_an_unreadable_model_file_is_a_tokenizer_error(tmp_path: Path) -> None:
    bad = tmp_path / "spiece.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="cannot read SentencePiece model"):
        SentencePieceTokenizer(bad, "siglip")


def test_without_sentencepiece_the_error_says_how_to_install_it(
    siglip_files: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def refuse_sentencepiece(name: str, *args: object, **kwargs: object) -> object:
        if name == "sentencepiece":
            raise ImportError("No module named 'sentencepiece'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.delitem(sys.modules, "sentencepiece", raising=False)
    monkeypatch.setattr(builtins, "__import__", refuse_sentencepiece)
    with pytest.raises(MissingDependencyError, match=r"pip install 'clip-search\[siglip\]'"):
        SentencePieceTokenizer(siglip_files[0], "siglip")
