"""Write the settings table of docs/serving.md from app.settings (tests/app/test_settings_doc.py checks they agree).

Usage: .venv/bin/python scripts/settings_doc.py
"""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import settings_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "serving.md"
BLOCK = re.compile(r"(<!-- settings table: .*? -->\n)(.*?)(<!-- end of settings table -->)", re.DOTALL)


def main() -> None:
    text = DOC.read_text(encoding="utf-8")
    if not BLOCK.search(text):
        raise SystemExit(f"{DOC} has no settings table block")
    DOC.write_text(BLOCK.sub(lambda m: m.group(1) + settings_table() + m.group(3), text), encoding="utf-8")


if __name__ == "__main__":
    main()
