"""The architecture's arrows: clip_model imports neither indexer nor app; indexer never imports app; app reads the
index only through indexer.store.reader (and the indexer's errors), never the rest of the indexer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"clip_model": {"indexer", "app"}, "indexer": {"app"}}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_does_not_import_downstream_packages(package: str) -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {bad}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for bad in imported_packages(path) & FORBIDDEN[package]
    ]
    assert offenders == []


APP_MAY_IMPORT_FROM_INDEXER = {"indexer.store.reader", "indexer.errors"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_app_reads_the_index_only_through_the_store() -> None:
    offenders = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in sorted((ROOT / "app").rglob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] == "indexer" and module not in APP_MAY_IMPORT_FROM_INDEXER
    ]
    assert offenders == []


def test_nothing_imports_the_training_package() -> None:
    """clip_model.train uses the library; the library, the indexer and the app never import it."""
    offenders = []
    for path in sorted(ROOT.glob("*/**/*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[0] not in ("clip_model", "indexer", "app") or relative.parts[:2] == ("clip_model", "train"):
            continue
        source = path.read_text(encoding="utf-8")
        if "clip_model.train" in imported_modules(path) or "from .train" in source or "from . import train" in source:
            offenders.append(str(relative))
    assert offenders == []


def test_clip_model_does_not_import_torchvision() -> None:
    offenders = [p for p in (ROOT / "clip_model").rglob("*.py") if "torchvision" in imported_packages(p)]
    assert offenders == []


def test_layering_check_detects_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from app.main import create_app\nimport indexer.store\nfrom indexer.build import build_index\n")
    assert imported_packages(bad) >= {"app", "indexer"}
    assert "indexer.build" in imported_modules(bad) - APP_MAY_IMPORT_FROM_INDEXER
    assert "indexer.store" in imported_modules(bad) - APP_MAY_IMPORT_FROM_INDEXER  # the package holds the writer too
    good = tmp_path / "good.py"
    good.write_text("from indexer.errors import IndexerError\nfrom indexer.store.reader import PublishedIndex\n")
    assert imported_modules(good) <= APP_MAY_IMPORT_FROM_INDEXER
