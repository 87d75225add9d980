"""docs/serving.md shows every setting as app/settings.py defines it (its table is generated, never edited by hand)."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings, settings_table

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def test_every_setting_is_described() -> None:
    assert [name for name, field in Settings.model_fields.items() if not field.description] == []


def test_the_docs_show_the_settings_table_of_the_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert settings_table() in text, "docs/serving.md is out of date: run .venv/bin/python scripts/settings_doc.py"
