"""Prompt templates are parsed, never ``str.format``-ed: exactly one empty ``{}``, escaped braces, bounded length."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clip_model
from clip_model.zeroshot import MAX_TEMPLATE_CHARS, TEMPLATE_PATTERN, split_template, zero_shot_prompts


@pytest.mark.parametrize(
    ("template", "pieces"),
    [
        ("a photo of a {}.", ("a photo of a ", ".")),
        ("{}", ("", "")),
        ("{{}}{}", ("{}", "")),
        ("{{x}} {} }}", ("{x} ", " }")),
        ("{}}}", ("", "}")),
    ],
)
def test_a_template_splits_around_its_one_field_with_braces_unescaped(template: str, pieces: tuple[str, str]) -> None:
    assert split_template(template) == pieces


@pytest.mark.parametrize(
    "template",
    [
        "no field",
        "{} {}",
        "{} {x}",
        "{!r} {}",
        "{.__class__} {}",
        "{0} {}",
        "{[0]}",
        "{:}",
        "{:>5}",
        "{{}}{:>200000000}",
        "{:{}}",
        "{ }",
        "{",
        "}",
        "a } {}",
        "{}" + "x" * MAX_TEMPLATE_CHARS,
    ],
)
def test_templates_with_other_fields_or_unbalanced_braces_are_refused_by_name(template: str) -> None:
    with pytest.raises(ValueError, match="template") as refused:
        split_template(template)
    assert repr(template[:20])[:-1] in str(refused.value)  # the message quotes the template


def test_prompts_replace_the_field_by_the_label_without_formatting_it() -> None:
    prompts = zero_shot_prompts(["cat", "{0.__class__}", "{}"], ["a {}.", "{{{}}}"])
    assert prompts == ["a cat.", "{cat}", "a {0.__class__}.", "{{0.__class__}}", "a {}.", "{{}}"]


def test_a_format_spec_cannot_make_a_huge_prompt() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot_prompts(["x"], ["{{}}{:>200000000}"])


def test_the_shipped_template_sets_follow_the_rule() -> None:
    for name in clip_model.zeroshot.TEMPLATE_SETS:
        for template in clip_model.prompt_templates(name):
            assert re.fullmatch(TEMPLATE_PATTERN, template), template
            split_template(template)


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(alphabet="{}!:.[]0xr a\n", max_size=12))
def test_the_schema_pattern_accepts_exactly_what_the_parser_accepts(template: str) -> None:
    try:
        split_template(template)
        parsed = True
    except ValueError:
        parsed = False
    assert bool(re.fullmatch(TEMPLATE_PATTERN, template)) == parsed, template
