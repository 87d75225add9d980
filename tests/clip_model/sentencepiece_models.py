"""Small SentencePiece models trained in the tests, shaped like the real SigLIP and XLM-RoBERTa vocabularies.

- ``train_siglip_model``: unigram, T5's special pieces (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), as SigLIP's
  ``spiece.model``;
- ``train_gemma_model``: byte-fallback BPE with Gemma's (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3,
  ``<mask>``), identity normalization, no dummy prefix and split digits, as SigLIP 2's ``tokenizer.model``;
- ``train_xlm_roberta_model``: unigram with ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2 and no pad piece, as XLM-RoBERTa's
  ``sentencepiece.bpe.model`` (transformers renumbers its ids as fairseq does).

The corpus mixes English words, accented and non-Latin words, digits and made-up words.
"""

from __future__ import annotations

import random
from pathlib import Path

import sentencepiece as spm

SYLLABLES = "ka ri to ne su mo la pe di ga ro vi chu sha thi ble str ing ed er ly tion".split()
WORDS = (
    "a photo of the cat dog on beach running red blue green house tree car people street city night sky mountain "
    "water river boat food plate table chair window door café über straße naïve 東京 日本 猫 犬 résumé Привет мир "
    "2024 3.14 don't it's"
).split()
CORPUS_LINES = 5000
SIGLIP_VOCAB = 300  # the largest a unigram model of this corpus allows
GEMMA_VOCAB = 800  # 256 byte pieces + the corpus's characters + merges


def _corpus(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = WORDS + ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(CORPUS_LINES)]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def train_siglip_model(folder: Path) -> Path:
    """A SigLIP-like ``spiece.model`` in ``folder``."""
    spm.SentencePieceTrainer.train(
        input=str(_corpus(folder / "corpus.txt")), model_prefix=str(folder / "spiece"), vocab_size=SIGLIP_VOCAB,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>",
        unk_piece="<unk>", character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return folder / "spiece.model"


def train_gemma_model(folder: Path) -> Path:
    """A Gemma-like (SigLIP 2) ``tokenizer.model`` in ``folder``."""
    spm.SentencePieceTrainer.train(
        input=str(_corpus(folder / "corpus.txt")), model_prefix=str(folder / "tokenizer"), vocab_size=GEMMA_VOCAB,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=["<mask>"], byte_fallback=True,
        add_dummy_prefix=False, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return folder / "tokenizer.model"


def train_xlm_roberta_model(folder: Path) -> Path:
    """An XLM-RoBERTa-like ``sentencepiece.bpe.model`` in ``folder``."""
    spm.SentencePieceTrainer.train(
        input=str(_corpus(folder / "corpus.txt")), model_prefix=str(folder / "sentencepiece.bpe"),
        vocab_size=SIGLIP_VOCAB, model_type="unigram", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return folder / "sentencepiece.bpe.model"
