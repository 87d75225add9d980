"""The shapes captions in English, German and French: hand-written word tables and one rendering per phrasing of
:data:`clip_model.train.synthetic.CAPTION_TEMPLATES`, for the multilingual demo (:mod:`.multilingual`).

Each image gets one caption per language, all three in the same phrasing: the English caption is
:mod:`~clip_model.train.synthetic`'s, and the German and French ones fill the template of the same index in
:data:`TEMPLATES` (recovered from the English caption by :func:`template_of`), so the three say the same thing about
the same attributes. :func:`attribute_query_in` gives the canonical query of a record in each language ("a small red
circle", "ein kleiner roter Kreis", "un petit cercle rouge").

Grammar. The tables are hand-written, and agreement is done, not approximated:

- German: nouns carry their gender (der Kreis, das Quadrat, die Raute, ...); adjectives take the mixed declension
  after "ein" in the nominative and accusative ("ein kleiner roter Kreis", "es gibt einen kleinen roten Kreis"),
  the weak one after "einem"/"einer" in the dative ("mit einer kleinen roten Raute") and the strong one without an
  article ("kleines rotes Quadrat", "auf weißem Hintergrund"). "orange", "lila" and "rosa" do not decline in
  written German, so the declinable "orangefarben", "violett" and "rosafarben" stand for them. A predicative size
  ("ein roter Kreis, klein") stays uninflected.
- French: sizes precede the noun and colours follow it ("un petit cercle rouge"), both agree in gender with the noun
  (une petite étoile verte; "orange" and "rose" are invariable); backgrounds agree with "image" (une image blanche)
  and stay masculine after "fond" (sur fond blanc).
- A query without a shape names a generic shape as the English one does: "Form" (f), "forme" (f).

Invariants (tested): every attribute value of the dataset, novel colours included, has words in each language; each
language has one template per English phrasing, naming the same attributes; captions and queries depend only on the
attributes (and phrasing); within a language, different attributes give different queries.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from . import synthetic
from .data import DatasetError

Language = Literal["en", "de", "fr"]
LANGUAGES: tuple[Language, ...] = ("en", "de", "fr")
Gender = Literal["m", "f", "n"]
SHAPELESS = "shape"  # the shape key of a query that names no shape ("a small red shape")

# German: nouns with their gender, adjective stems (declined by _german_phrase), adverbial positions.
GERMAN_SHAPES: dict[str, tuple[str, Gender]] = {
    "circle": ("Kreis", "m"),
    "square": ("Quadrat", "n"),
    "triangle": ("Dreieck", "n"),
    "star": ("Stern", "m"),
    "diamond": ("Raute", "f"),
    "cross": ("Kreuz", "n"),
    SHAPELESS: ("Form", "f"),
}
GERMAN_COLORS = {
    "red": "rot",
    "green": "grün",
    "blue": "blau",
    "yellow": "gelb",
    "purple": "violett",
    "orange": "orangefarben",
    "pink": "rosafarben",
}
GERMAN_SIZES = {"small": "klein", "large": "groß"}
GERMAN_BACKGROUNDS = {"white": "weiß", "black": "schwarz", "gray": "grau"}
GERMAN_POSITIONS = {
    "top left": "oben links",
    "top right": "oben rechts",
    "bottom left": "unten links",
    "bottom right": "unten rechts",
    "center": "in der Mitte",
}
Case = Literal["nom", "acc", "dat"]
GERMAN_ARTICLES: dict[Case, dict[Gender, str]] = {
    "nom": {"m": "ein", "n": "ein", "f": "eine"},
    "acc": {"m": "einen", "n": "ein", "f": "eine"},
    "dat": {"m": "einem", "n": "einem", "f": "einer"},
}
GERMAN_ENDINGS: dict[Case, dict[Gender, str]] = {  # adjective endings after the article (or, nom, without one)
    "nom": {"m": "er", "n": "es", "f": "e"},
    "acc": {"m": "en", "n": "es", "f": "e"},
    "dat": {"m": "en", "n": "en", "f": "en"},
}

# French: nouns with their gender, adjectives as (masculine, feminine), positions.
FRENCH_SHAPES: dict[str, tuple[str, Gender]] = {
    "circle": ("cercle", "m"),
    "square": ("carré", "m"),
    "triangle": ("triangle", "m"),
    "star": ("étoile", "f"),
    "diamond": ("losange", "m"),
    "cross": ("croix", "f"),
    SHAPELESS: ("forme", "f"),
}
FRENCH_COLORS = {
    "red": ("rouge", "rouge"),
    "green": ("vert", "verte"),
    "blue": ("bleu", "bleue"),
    "yellow": ("jaune", "jaune"),
    "purple": ("violet", "violette"),
    "orange": ("orange", "orange"),
    "pink": ("rose", "rose"),
}
FRENCH_SIZES = {"small": ("petit", "petite"), "large": ("grand", "grande")}
FRENCH_BACKGROUNDS = {"white": ("blanc", "blanche"), "black": ("noir", "noire"), "gray": ("gris", "grise")}
FRENCH_POSITIONS = {
    "top left": "en haut à gauche",
    "top right": "en haut à droite",
    "bottom left": "en bas à gauche",
    "bottom right": "en bas à droite",
    "center": "au centre",
}

# One rendering per entry of synthetic.CAPTION_TEMPLATES, in its order. Slots (filled by _german_slots and
# _french_slots): {a_np} "ein kleiner roter Kreis" / "un petit cercle rouge"; {np} the same without the article;
# {a_color_np}, {color_np} the same without the size; German {a_acc}, {a_dat} the accusative and dative;
# {size} the predicative size; {position}; {background} the German stem or the French masculine, {background_f}
# the French feminine.
TEMPLATES: dict[Language, tuple[str, ...]] = {
    "de": (
        "{a_np} {position} auf {background}em Hintergrund",
        "{a_color_np}, {size}, {position}, Hintergrund {background}",
        "{np} {position}",
        "ein {background}es Bild mit {a_dat} {position}",
        "ein Foto von {a_dat} {position}",
        "{color_np}, {size}, {position} auf einem {background}en Bild",
        "es gibt {a_acc} {position}",
        "{a_np}",
        "{a_color_np}",
        "{a_np} auf {background}em Hintergrund",
        "{a_color_np} {position}",
    ),
    "fr": (
        "{a_np} {position} sur fond {background}",
        "{a_color_np}, {size}, {position}, fond {background}",
        "{np} {position}",
        "une image {background_f} avec {a_np} {position}",
        "une photo d'{a_np} {position}",
        "{color_np}, {size}, {position} d'une image {background_f}",
        "il y a {a_np} {position}",
        "{a_np}",
        "{a_color_np}",
        "{a_np} sur fond {background}",
        "{a_color_np} {position}",
    ),
}
WORD_TABLES: dict[Language, dict[str, Mapping[str, object]]] = {  # per language, per attribute: value -> words
    "de": {
        "shape": GERMAN_SHAPES,
        "color": GERMAN_COLORS,
        "size": GERMAN_SIZES,
        "position": GERMAN_POSITIONS,
        "background": GERMAN_BACKGROUNDS,
    },
    "fr": {
        "shape": FRENCH_SHAPES,
        "color": FRENCH_COLORS,
        "size": FRENCH_SIZES,
        "position": FRENCH_POSITIONS,
        "background": FRENCH_BACKGROUNDS,
    },
}
QUERY_FIELDS = ("size", "color", "shape")  # the attributes of the evaluation queries, as the English demo's
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {  # every value the tables must translate: the dataset's own
    "shape": synthetic.SHAPES,
    "color": (*synthetic.COLORS, *synthetic.NOVEL_COLORS),
    "size": tuple(synthetic.SIZES),
    "position": tuple(synthetic.POSITIONS),
    "background": tuple(synthetic.BACKGROUNDS),
}
CAPTIONS_FILE = "captions.multilingual.jsonl"  # beside each split's captions.jsonl: path, caption, label, language


def _german_phrase(case: Case | None, gender: Gender, noun: str, *stems: str) -> str:
    """``stems`` declined before ``noun``, with the indefinite article of ``case`` (None: nominative, no article)."""
    endings = GERMAN_ENDINGS[case or "nom"]
    words = [stem + endings[gender] for stem in stems]
    article = [GERMAN_ARTICLES[case][gender]] if case is not None else []
    return " ".join([*article, *words, noun])


def _french_phrase(
    article: bool, gender: Gender, noun: str, size: tuple[str, str] | None, *colors: tuple[str, str]
) -> str:
    """``size`` before ``noun`` and ``colors`` after it, each in ``gender``; "un"/"une" first if ``article``."""
    form = 0 if gender == "m" else 1
    words = [("un", "une")[form]] if article else []
    words += [size[form]] if size is not None else []
    return " ".join([*words, noun, *(color[form] for color in colors)])


def _german_slots(a: Mapping[str, str]) -> dict[str, str]:
    noun, gender = GERMAN_SHAPES[a["shape"]]
    size, color = GERMAN_SIZES[a["size"]], GERMAN_COLORS[a["color"]]
    return {
        "a_np": _german_phrase("nom", gender, noun, size, color),
        "np": _german_phrase(None, gender, noun, size, color),
        "a_color_np": _german_phrase("nom", gender, noun, color),
        "color_np": _german_phrase(None, gender, noun, color),
        "a_acc": _german_phrase("acc", gender, noun, size, color),
        "a_dat": _german_phrase("dat", gender, noun, size, color),
        "size": size,
        "position": GERMAN_POSITIONS[a["position"]],
        "background": GERMAN_BACKGROUNDS[a["background"]],
    }


def _french_slots(a: Mapping[str, str]) -> dict[str, str]:
    noun, gender = FRENCH_SHAPES[a["shape"]]
    size, color = FRENCH_SIZES[a["size"]], FRENCH_COLORS[a["color"]]
    background = FRENCH_BACKGROUNDS[a["background"]]
    return {
        "a_np": _french_phrase(True, gender, noun, size, color),
        "np": _french_phrase(False, gender, noun, size, color),
        "a_color_np": _french_phrase(True, gender, noun, None, color),
        "color_np": _french_phrase(False, gender, noun, None, color),
        "size": size[0 if gender == "m" else 1],
        "position": FRENCH_POSITIONS[a["position"]],
        "background": background[0],
        "background_f": background[1],
    }


def _check_language(language: str) -> Language:
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; choose one of {', '.join(LANGUAGES)}")
    return language


def caption_in(language: str, attributes: Mapping[str, str], template: int) -> str:
    """The caption of ``attributes`` (a record's shape, color, size, position, background) in ``language``, in the
    phrasing of ``synthetic.CAPTION_TEMPLATES[template]``. ValueError for an unknown language, template or value."""
    language = _check_language(language)
    if not 0 <= template < len(synthetic.CAPTION_TEMPLATES):
        raise ValueError(f"template must be in [0, {len(synthetic.CAPTION_TEMPLATES)}), got {template}")
    _check_values(attributes, synthetic.ATTRIBUTES)
    if language == "en":
        return synthetic.caption_for(attributes, synthetic.CAPTION_TEMPLATES[template])
    slots = _german_slots(attributes) if language == "de" else _french_slots(attributes)
    return TEMPLATES[language][template].format(**slots)


def _check_values(attributes: Mapping[str, str], names: Sequence[str]) -> None:
    """ValueError unless each of ``names`` has a value of the shapes dataset (novel colours included)."""
    for name in names:
        known = ATTRIBUTE_VALUES[name]
        if attributes.get(name) not in known:
            raise ValueError(f"unknown {name} {attributes.get(name)!r}; choose one of {', '.join(known)}")


def template_of(record: synthetic.ShapeRecord) -> int:
    """The index in ``synthetic.CAPTION_TEMPLATES`` of the phrasing of ``record``'s (English) caption; DatasetError
    when none gives it (a captions file from another generator version)."""
    for index, template in enumerate(synthetic.CAPTION_TEMPLATES):
        if synthetic.caption_for(record.attributes, template) == record.caption:
            return index
    raise DatasetError(f"{record.path}: caption {record.caption!r} is not one of the shapes templates")


def captions_of(record: synthetic.ShapeRecord) -> dict[Language, str]:
    """``record``'s caption in each of :data:`LANGUAGES`, all in its English caption's phrasing."""
    template = template_of(record)
    return {language: caption_in(language, record.attributes, template) for language in LANGUAGES}


def attribute_query_in(language: str, attributes: Mapping[str, str], fields: Sequence[str] = QUERY_FIELDS) -> str:
    """:func:`synthetic.attribute_query` in ``language``: the canonical text naming only ``fields`` of a record,
    e.g. "a small red circle", "ein kleiner roter Kreis", "un petit cercle rouge". Equal fields give equal texts and
    different fields different texts, in every language."""
    language = _check_language(language)
    if language == "en":
        return synthetic.attribute_query(attributes, fields)
    unknown = set(fields) - set(synthetic.ATTRIBUTES)
    if unknown or not fields:
        raise ValueError(f"fields must be a non-empty subset of {synthetic.ATTRIBUTES}, got {tuple(fields)}")
    _check_values(attributes, fields)
    shape = attributes["shape"] if "shape" in fields else SHAPELESS
    words = _german_query(attributes, fields, shape) if language == "de" else _french_query(attributes, fields, shape)
    return " ".join(words)


def _german_query(attributes: Mapping[str, str], fields: Sequence[str], shape: str) -> list[str]:
    noun, gender = GERMAN_SHAPES[shape]
    sizes = [GERMAN_SIZES[attributes["size"]]] if "size" in fields else []
    colors = [GERMAN_COLORS[attributes["color"]]] if "color" in fields else []
    words = [_german_phrase("nom", gender, noun, *sizes, *colors)]
    if "position" in fields:
        words.append(GERMAN_POSITIONS[attributes["position"]])
    if "background" in fields:
        words.append(f"auf {GERMAN_BACKGROUNDS[attributes['background']]}em Hintergrund")
    return words


def _french_query(attributes: Mapping[str, str], fields: Sequence[str], shape: str) -> list[str]:
    noun, gender = FRENCH_SHAPES[shape]
    size = FRENCH_SIZES[attributes["size"]] if "size" in fields else None
    colors = [FRENCH_COLORS[attributes["color"]]] if "color" in fields else []
    words = [_french_phrase(True, gender, noun, size, *colors)]
    if "position" in fields:
        words.append(FRENCH_POSITIONS[attributes["position"]])
    if "background" in fields:
        words.append(f"sur fond {FRENCH_BACKGROUNDS[attributes['background']][0]}")
    return words


def write_captions(split_dir: Path) -> Path:
    """Write ``split_dir/captions.multilingual.jsonl`` for a folder :func:`synthetic.generate` wrote: for each image,
    in file order, one record per language (``path``, ``caption``, ``label`` = shape, ``language``). The file
    depends only on ``captions.jsonl``; returns its path."""
    lines = []
    for record in synthetic.load_records(split_dir):
        relative = record.path.relative_to(split_dir).as_posix()
        for language, caption in captions_of(record).items():
            row = {"path": relative, "caption": caption, "label": record.label, "language": language}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    path = split_dir / CAPTIONS_FILE
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text("".join(lines), encoding="utf-8")
    os.replace(partial, path)
    return path


def tables_fingerprint() -> str:
    """sha256 of every word table and template, so a changed translation changes the recipe's key."""
    payload = {"tables": WORD_TABLES, "templates": TEMPLATES, "articles": GERMAN_ARTICLES, "endings": GERMAN_ENDINGS}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
