"""GET /api/duplicates through the real app over a folder with planted copies (tests.indexer.scenes): the groups the
indexer's duplicates module finds, in pages, cached per generation, and the refusals."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.paging import Cursor
from app.settings import Settings
from indexer import duplicates
from indexer.cli import main as clip_index
from indexer.store import PublishedIndex
from tests.conftest import PlantedIndex
from tests.indexer.scenes import exact_copy


def _client(index_dir: Path, tmp_path: Path) -> TestClient:
    return TestClient(create_app(Settings(index_dir=index_dir, cache_dir=tmp_path / "cache"), watch=False))


@pytest.fixture
def client(planted_index: PlantedIndex, tmp_path: Path) -> Iterator[TestClient]:
    with _client(planted_index.index_dir, tmp_path) as test_client:
        yield test_client


def _walk(client: TestClient, **params: Any) -> list[dict[str, Any]]:
    """Every group, page after page."""
    groups: list[dict[str, Any]] = []
    cursor = None
    while True:
        response = client.get("/api/duplicates", params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        groups += body["groups"]
        cursor = body["next_cursor"]
        if cursor is None:
            return groups


def test_the_groups_are_the_indexers(client: TestClient, planted_index: PlantedIndex) -> None:
    with PublishedIndex.open(planted_index.index_dir) as index:
        found = duplicates.find_duplicates(index)
    body = client.get("/api/duplicates").json()
    assert body["groups"] == json.loads(json.dumps([asdict(group) for group in found.groups]))
    assert (body["total_groups"], body["images"]) == (len(found.groups), len(planted_index.library.copies))
    assert (body["threshold"], body["folder"], body["next_cursor"]) == (duplicates.DEFAULT_THRESHOLD, None, None)


def test_pages_hand_out_every_group_once_in_order(client: TestClient) -> None:
    everything = client.get("/api/duplicates", params={"threshold": 0.99}).json()["groups"]
    assert len(everything) >= 3
    assert _walk(client, threshold=0.99, page_size=2) == everything
    assert _walk(client, threshold=0.99, page_size=1) == everything


def test_a_result_is_found_once_per_generation_and_arguments(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    find = duplicates.find_duplicates

    def counted(*args: Any) -> duplicates.Duplicates:
        calls.append(args[1:])
        return find(*args)

    monkeypatch.setattr(duplicates, "find_duplicates", counted)
    _walk(client, page_size=1)
    _walk(client, page_size=1, folder="copies/")
    client.get("/api/duplicates", params={"folder": "copies"})
    assert calls == [(duplicates.DEFAULT_THRESHOLD, None), (duplicates.DEFAULT_THRESHOLD, "copies")]


def test_folder_compares_the_images_under_it(client: TestClient, planted_index: PlantedIndex) -> None:
    body = client.get("/api/duplicates", params={"folder": "copies"}).json()
    assert body["folder"] == "copies" and body["images"] == 4 * len(planted_index.library.groups)
    assert all(m["path"].startswith("copies/") for group in body["groups"] for m in group["members"])


def test_a_cursor_from_a_replaced_generation_is_a_409(planted_index: PlantedIndex, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    shutil.copytree(planted_index.library.root, root)
    shutil.copytree(planted_index.index_dir, index_dir)
    with _client(index_dir, tmp_path) as client:
        first = client.get("/api/duplicates", params={"page_size": 1}).json()
        exact_copy(root / "camera" / "scene_012.jpg", root / "backup" / "scene_012.jpg")
        command = ["build", str(root), "--index-dir", str(index_dir), "--model", str(planted_index.model)]
        assert clip_index([*command, "--workers", "0"]) == 0
        assert client.app.state.runtime.refresh()  # type: ignore[attr-defined]  # the app's lifespan state
        response = client.get("/api/duplicates", params={"cursor": first["next_cursor"]})
        assert response.status_code == 409
        assert "search again without the cursor" in response.json()["detail"]
        fresh = client.get("/api/duplicates").json()
        assert fresh["generation"] != first["generation"]
        assert fresh["total_groups"] == first["total_groups"] + 1


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"cursor": "bm90IGEgY3Vyc29y"}, "cursor is not one this server gave out"),
        ({"cursor": "%%%"}, "cursor is not one this server gave out"),
        ({"folder": "no/such/folder"}, "unknown folder 'no/such/folder': no indexed image matches it"),
        ({"folder": "Copies"}, "did you mean 'copies'?"),
    ],
)
def test_bad_cursors_and_unknown_folders_are_422s(client: TestClient, params: dict[str, str], detail: str) -> None:
    response = client.get("/api/duplicates", params=params)
    assert response.status_code == 422
    assert detail in response.json()["detail"]


@pytest.mark.parametrize("params", [{"threshold": 0.5}, {"threshold": 1.5}, {"page_size": 0}, {"page_size": 1001}])
def test_parameters_out_of_range_are_422s(client: TestClient, params: dict[str, float]) -> None:
    assert client.get("/api/duplicates", params=params).status_code == 422


def test_a_cursor_edited_to_a_threshold_out_of_range_is_a_422(client: TestClient) -> None:
    generation = client.get("/api/duplicates").json()["generation"]
    edited = Cursor(generation, 1, "any", {"threshold": 0.1, "folder": None}).encode()
    response = client.get("/api/duplicates", params={"cursor": edited})
    assert response.status_code == 422 and "cursor is not one this server gave out" in response.json()["detail"]


def test_a_cursor_keeps_its_threshold_and_folder(client: TestClient) -> None:
    cursor = client.get("/api/duplicates", params={"page_size": 1, "threshold": 0.99}).json()["next_cursor"]
    assert client.get("/api/duplicates", params={"cursor": cursor}).json()["threshold"] == 0.99
    response = client.get("/api/duplicates", params={"cursor": cursor, "threshold": 0.995})
    assert response.status_code == 422 and "the cursor continues the groups" in response.json()["detail"]


def test_a_folder_without_duplicates_is_an_empty_page(client: TestClient) -> None:
    body = client.get("/api/duplicates", params={"folder": "camera", "threshold": 1.0}).json()
    assert body["images"] > 0 and (body["groups"], body["total_groups"], body["next_cursor"]) == ([], 0, None)


def test_search_and_duplicate_cursors_share_one_format_but_not_their_lists(client: TestClient) -> None:
    search = client.get("/api/search", params={"q": "a photo", "k": 1}).json()["next_cursor"]
    groups = client.get("/api/duplicates", params={"threshold": 0.99, "page_size": 1}).json()["next_cursor"]
    assert Cursor.decode(search).generation == Cursor.decode(groups).generation
    refused = client.get("/api/duplicates", params={"cursor": search})
    assert refused.status_code == 422 and "cursor is not one this server gave out" in refused.json()["detail"]
    refused = client.get("/api/search", params={"q": "a photo", "k": 1, "cursor": groups})
    assert refused.status_code == 422 and "cursor belongs to another query" in refused.json()["detail"]


def test_an_edited_cursor_is_a_422(client: TestClient) -> None:
    cursor = client.get("/api/duplicates", params={"threshold": 0.99, "page_size": 1}).json()["next_cursor"]
    fields = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    for edit in ({"o": 2}, {"p": {"threshold": 0.99, "folder": "copies"}}, {"g": "g-000009"}):
        edited = base64.urlsafe_b64encode(json.dumps({**fields, **edit}).encode()).decode()
        response = client.get("/api/duplicates", params={"cursor": edited})
        assert response.status_code == 422 and "cursor is not one this server gave out" in response.json()["detail"]
