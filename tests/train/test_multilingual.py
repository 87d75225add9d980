"""The multilingual shapes captions (tables complete, phrasings parallel, grammar spot-checked, deterministic), the
vocabulary trained on them, and a tiny multilingual demo build (the trained model loads with its vocabulary)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import sentencepiece
import torch

import clip_model
from clip_model.config import config_from_dict
from clip_model.factory import create_model, tokenizer_for
from clip_model.tokenizer_sentencepiece import SentencePieceTokenizer
from clip_model.train import multilingual, synthetic
from clip_model.train.data import DatasetError, read_pairs
from clip_model.train.demo import demo_paths
from clip_model.train.evaluate import normalize_caption
from clip_model.train.multilingual import Recipe, build_multilingual, multilingual_paths, train_vocabulary
from clip_model.train.multilingual_captions import (
    ATTRIBUTE_VALUES,
    CAPTIONS_FILE,
    LANGUAGES,
    TEMPLATES,
    WORD_TABLES,
    Language,
    attribute_query_in,
    caption_in,
    captions_of,
    template_of,
    write_captions,
)
from clip_model.xlm_roberta import XLMRobertaCLIP

SMALL = 16  # image side for tests that only need captions
FAIRSEQ_UNK = 3
EXAMPLE = {"shape": "circle", "color": "red", "size": "small", "position": "top left", "background": "white"}


def every_attributes() -> list[dict[str, str]]:
    """Every combination of the dataset's attribute values (novel colours included)."""
    names = list(ATTRIBUTE_VALUES)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*ATTRIBUTE_VALUES.values())]


def sampled_records(count: int) -> list[synthetic.ShapeRecord]:
    """Records as the train split draws them, without drawing images."""
    records = []
    for index in range(count):
        attributes, caption, _ = synthetic.sample_attributes("train", 0, index)
        records.append(synthetic.ShapeRecord(path=Path(f"{index}.png"), caption=caption, **attributes))
    return records


@pytest.mark.parametrize("language", ["de", "fr"])
def test_every_attribute_value_has_words_in_each_language(language: Language) -> None:
    assert set(ATTRIBUTE_VALUES) == set(synthetic.ATTRIBUTES)
    assert set(ATTRIBUTE_VALUES["color"]) == {*synthetic.COLORS, *synthetic.NOVEL_COLORS}
    for name, values in ATTRIBUTE_VALUES.items():
        table = set(WORD_TABLES[language][name]) - {"shape"}  # "shape": the generic noun of shapeless queries
        assert table == set(values), (language, name)


@pytest.mark.parametrize("language", ["de", "fr"])
def test_each_phrasing_names_the_same_attributes_as_the_english_one(language: Language) -> None:
    assert len(TEMPLATES[language]) == len(synthetic.CAPTION_TEMPLATES)
    other = {"shape": "star", "color": "blue", "size": "large", "position": "center", "background": "black"}
    for template in range(len(synthetic.CAPTION_TEMPLATES)):
        for name in synthetic.ATTRIBUTES:
            changed = {**EXAMPLE, name: other[name]}
            english = caption_in("en", EXAMPLE, template) != caption_in("en", changed, template)
            translated = caption_in(language, EXAMPLE, template) != caption_in(language, changed, template)
            assert english == translated, (template, name)


@pytest.mark.parametrize(
    ("language", "template", "attributes", "expected"),
    [
        ("de", 0, EXAMPLE, "ein kleiner roter Kreis oben links auf weißem Hintergrund"),
        ("de", 2, {"shape": "square", "color": "blue", "size": "small"}, "kleines blaues Quadrat oben links"),
        ("de", 3, {"shape": "diamond", "color": "purple", "size": "large", "position": "center"},
         "ein weißes Bild mit einer großen violetten Raute in der Mitte"),
        ("de", 6, {"shape": "star", "color": "green", "position": "bottom right"},
         "es gibt einen kleinen grünen Stern unten rechts"),
        ("de", 1, {"shape": "cross", "color": "orange", "background": "gray"},
         "ein orangefarbenes Kreuz, klein, oben links, Hintergrund grau"),
        ("fr", 9, {"shape": "star", "color": "green", "background": "black"},
         "une petite étoile verte sur fond noir"),
        ("fr", 5, {"shape": "cross", "color": "blue", "position": "center", "background": "gray"},
         "croix bleue, petite, au centre d'une image grise"),
        ("fr", 4, {"size": "large", "color": "purple"}, "une photo d'un grand cercle violet en haut à gauche"),
        ("fr", 3, {"shape": "diamond", "color": "orange"},
         "une image blanche avec un petit losange orange en haut à gauche"),
    ],
)  # fmt: skip
def test_captions_agree_in_gender_case_and_number(
    language: str, template: int, attributes: dict[str, str], expected: str
) -> None:
    assert caption_in(language, {**EXAMPLE, **attributes}, template) == expected


def test_attribute_queries_in_each_language() -> None:
    assert [attribute_query_in(language, EXAMPLE) for language in LANGUAGES] == [
        "a small red circle",
        "ein kleiner roter Kreis",
        "un petit cercle rouge",
    ]
    star = {**EXAMPLE, "shape": "star", "color": "purple", "size": "large"}
    assert attribute_query_in("de", star, ("color", "shape", "background")) == (
        "ein violetter Stern auf weißem Hintergrund"
    )
    assert attribute_query_in("fr", star, ("size", "color", "position")) == "une grande forme violette en haut à gauche"


@pytest.mark.parametrize("language", LANGUAGES)
def test_different_attributes_give_different_queries(language: str) -> None:
    combinations = every_attributes()
    for size in range(1, len(synthetic.ATTRIBUTES) + 1):
        for fields in itertools.combinations(synthetic.ATTRIBUTES, size):
            queries: dict[str, tuple[str, ...]] = {}
            for attributes in combinations:
                key = tuple(attributes[name] for name in fields)
                query = normalize_caption(attribute_query_in(language, attributes, fields))
                assert queries.setdefault(query, key) == key, (fields, query)


def test_captions_follow_the_english_phrasing_and_are_deterministic(tmp_path: Path) -> None:
    for record in sampled_records(200):
        captions = captions_of(record)
        assert captions["en"] == record.caption
        template = template_of(record)
        assert captions == {language: caption_in(language, record.attributes, template) for language in LANGUAGES}
    written = []
    for name in ("a", "b"):
        folder = synthetic.generate(tmp_path / name, 12, "train", seed=3, image_size=SMALL)
        written.append(write_captions(folder).read_bytes())
        assert write_captions(folder).read_bytes() == written[-1]
    assert written[0] == written[1]
    rows = [json.loads(line) for line in written[0].decode().splitlines()]
    records = synthetic.load_records(tmp_path / "a")
    assert [row["language"] for row in rows] == list(LANGUAGES) * len(records)
    assert [row["path"] for row in rows[::3]] == [f"images/{i:06d}.png" for i in range(len(records))]
    assert [row["caption"] for row in rows[::3]] == [record.caption for record in records]
    pairs = read_pairs(tmp_path / "a", tmp_path / "a" / CAPTIONS_FILE)
    assert len(pairs) == 3 * len(records) and all(pair.label is not None for pair in pairs)


def test_foreign_captions_values_and_languages_are_refused() -> None:
    record = synthetic.ShapeRecord(Path("x.png"), "a red circle somewhere", **EXAMPLE)
    with pytest.raises(DatasetError, match="not one of the shapes templates"):
        template_of(record)
    with pytest.raises(ValueError, match="unknown language 'es'"):
        caption_in("es", EXAMPLE, 0)
    with pytest.raises(ValueError, match="unknown color 'teal'"):
        attribute_query_in("de", {**EXAMPLE, "color": "teal"})
    with pytest.raises(ValueError, match="template must be in"):
        caption_in("fr", EXAMPLE, len(synthetic.CAPTION_TEMPLATES))


def test_vocabulary_covers_every_caption_word_folds_case_and_is_deterministic(tmp_path: Path) -> None:
    captions = [caption for record in sampled_records(300) for caption in captions_of(record).values()]
    files = [train_vocabulary(captions, tmp_path / f"{n}.txt", tmp_path / f"{n}.model", 1000) for n in "ab"]
    pieces = []
    for file in files:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(file))
        pieces.append([processor.id_to_piece(i) for i in range(processor.get_piece_size())])
    assert pieces[0] == pieces[1]  # the same pieces (the files differ in the corpus path they record)
    tokenizer = SentencePieceTokenizer(files[0], "xlm-roberta")
    assert tokenizer.vocab_size <= 1000 + 2
    for caption in set(captions):
        assert FAIRSEQ_UNK not in tokenizer.encode(caption), caption
    assert tokenizer.encode("Ein Roter Kreis") == tokenizer.encode("ein roter kreis")
    assert len(tokenizer.encode("une grande étoile violette")) == 4  # one piece per word
    with pytest.raises(DatasetError):
        train_vocabulary([], tmp_path / "c.txt", tmp_path / "c.model", 1000)


def test_embedding_tables_are_not_decayed() -> None:
    config = config_from_dict(multilingual.multilingual_architecture(100))
    model, _ = create_model(config, seed=0)
    groups = {group["name"]: group for group in multilingual.param_groups(model, 0.2)}
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    names = {name for name, param in model.named_parameters() if id(param) in no_decay}
    prefix = "text.transformer.embeddings."
    assert {f"{prefix}{table}_embeddings.weight" for table in ("word", "position", "token_type")} <= names
    assert "text.proj.0.weight" not in names and groups["decay"]["weight_decay"] == 0.2


TINY: tuple[tuple[str, int], ...] = (("train_images", 48), ("test_images", 12), ("heldout_images", 8), ("steps", 2))
TINY += (("batch_size", 16), ("warmup_steps", 1))


def test_a_tiny_build_trains_a_text_tower_beside_the_english_demos_locked_image_tower(tmp_path: Path) -> None:
    recipe = Recipe(**dict(TINY), image_tower=TINY)
    report = build_multilingual(tmp_path, recipe)
    paths = multilingual_paths(tmp_path, recipe)
    model, _ = clip_model.load(paths["model"])
    assert isinstance(model, XLMRobertaCLIP)
    english, _ = clip_model.load(report["image_tower"])
    assert report["image_tower"] == str(demo_paths(tmp_path, recipe.demo_recipe())["model"])
    for name, tensor in english.visual.state_dict().items():  # locked: bit for bit the English model's
        assert torch.equal(model.visual.state_dict()[name], tensor), name
    untrained, _ = create_model(config_from_dict(json.loads(paths["config"].read_text())), seed=recipe.seed)
    name = "text.proj.0.weight"
    assert not torch.equal(model.state_dict()[name], untrained.state_dict()[name])  # the text tower trained
    assert model.tokenizer_path == paths["vocabulary"] == paths["model"].parent / "sentencepiece.bpe.model"
    assert model.config.text.vocab_size == report["vocabulary"]["pieces"] == tokenizer_for(model).vocab_size
    assert len(read_pairs(paths["train"], paths["train"] / CAPTIONS_FILE)) == 3 * 48
    for split in ("test", "heldout"):
        assert set(report[split]) == set(LANGUAGES)
        for metrics in report[split].values():
            assert set(metrics) == {f"text_to_image_recall@{k}" for k in (1, 5, 10)} | {"queries"}
            assert all(0 <= value <= 1 for name, value in metrics.items() if name != "queries")
        assert len({metrics["queries"] for metrics in report[split].values()}) == 1  # the same queries in each
    paths["config"].unlink()  # a second call must not train (nor read the config) again
    assert build_multilingual(tmp_path, recipe) == report
    older = {k: v for k, v in report.items() if k not in ("evaluation_fields", "test")}  # an older evaluation's
    paths["report"].write_text(json.dumps(older), encoding="utf-8")
    assert build_multilingual(tmp_path, recipe) == report  # measured again, not trained again
    assert json.loads(paths["report"].read_text(encoding="utf-8")) == report
    assert Recipe(steps=3).key() != Recipe().key() != Recipe(seed=1).key()
    assert Recipe(image_tower=(("steps", 3),)).key() != Recipe().key()
