"""Pages of results through the HTTP API: a cursor continues the same ranked list without repeats or gaps, date
orders follow capture times, and a cursor is refused for another query or when edited (422), or for another
generation (409); every image search takes its result options from one dependency."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.errors import BadRequestError
from app.main import create_app
from app.paging import Cursor
from app.schemas import MAX_CURSOR_CHARS, TEXT_FIELD_MAX
from indexer.cli import main as clip_index
from tests.app.conftest import COLOURS, IndexedFolder, write_image

DAY_NS = 86_400 * 10**9
BASE_NS = 1_600_000_000 * 10**9


def ok(response: httpx.Response) -> dict[str, object]:
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def walk(client: TestClient, url: str, params: dict[str, object]) -> list[list[int]]:
    """Every page of a search, following next_cursor."""
    pages, cursor = [], None
    while True:
        body = ok(client.get(url, params={**params, **({"cursor": cursor} if cursor else {})}))
        pages.append([hit["id"] for hit in body["results"]])  # type: ignore[attr-defined]
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 50


def test_pages_follow_one_ranked_list_without_repeats_or_gaps(client: TestClient, indexed: IndexedFolder) -> None:
    whole = [hit["id"] for hit in ok(client.get("/api/search", params={"q": "a blue square", "k": 50}))["results"]]  # type: ignore[attr-defined]
    assert len(whole) == len(indexed.files)
    pages = walk(client, "/api/search", {"q": "a blue square", "k": 5})
    assert [len(p) for p in pages] == [5, 5, 2] and [i for p in pages for i in p] == whole
    first = whole[0]
    similar = walk(client, f"/api/images/{first}/similar", {"k": 4})
    everything = ok(client.get(f"/api/images/{first}/similar", params={"k": 50}))["results"]
    assert [i for p in similar for i in p] == [hit["id"] for hit in everything]  # type: ignore[attr-defined]
    assert len(everything) == len(indexed.files) - 1  # type: ignore[arg-type]  # all but the image itself


def test_a_cursor_is_refused_for_another_query_or_a_garbled_token(client: TestClient) -> None:
    cursor = ok(client.get("/api/search", params={"q": "a red square", "k": 3}))["next_cursor"]
    assert isinstance(cursor, str)
    assert client.get("/api/search", params={"q": "a red square", "k": 3, "cursor": cursor}).status_code == 200
    assert client.get("/api/search", params={"q": "something else", "cursor": cursor}).status_code == 422
    assert client.get("/api/search", params={"q": "a red square", "cursor": cursor, "folder": "red"}).status_code == 422
    assert (
        client.get("/api/search", params={"q": "a red square", "cursor": cursor, "sort": "newest"}).status_code == 422
    )
    for garbled in ("x", cursor[:-3], "eyJ2IjoxfQ", "%%%"):
        response = client.get("/api/search", params={"q": "a red square", "cursor": garbled})
        assert response.status_code == 422 and "cursor" in response.text


@pytest.fixture
def dated(tmp_path: Path, app_model: Path) -> Path:
    """A folder whose files' modification times are one day apart, in an order unrelated to their names."""
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    for i, (name, colour) in enumerate(COLOURS.items()):
        for j in range(3):
            path = write_image(root / f"{name}_{j}.jpg", colour, seed=10 * i + j)
            when = BASE_NS + ((7 * (3 * i + j)) % 12) * DAY_NS
            os.utime(path, ns=(when, when))
    assert (
        clip_index(["build", str(root), "--index-dir", str(index_dir), "--model", str(app_model), "--workers", "0"])
        == 0
    )
    return index_dir


def test_date_orders_follow_capture_times_across_pages_and_a_new_generation_refuses_old_cursors(
    dated: Path, tmp_path: Path, app_model: Path
) -> None:
    settings = IndexedFolder(dated.parent / "photos", dated, app_model, {}).settings(tmp_path)
    with TestClient(create_app(settings, watch=False)) as client:
        newest = walk(client, "/api/search", {"q": "a square", "k": 5, "sort": "newest"})
        oldest = walk(client, "/api/search", {"q": "a square", "k": 5, "sort": "oldest"})
        body = ok(client.get("/api/search", params={"q": "a square", "k": 50, "sort": "newest"}))
        times = [hit["taken_at"] for hit in body["results"]]  # type: ignore[attr-defined]
        assert times == sorted(times, reverse=True) and len(set(times)) == 12
        assert all(hit["taken_from_exif"] is False for hit in body["results"])  # type: ignore[attr-defined]
        assert [i for p in newest for i in p] == [hit["id"] for hit in body["results"]]  # type: ignore[attr-defined]
        assert [i for p in oldest for i in p] == list(reversed([i for p in newest for i in p]))
        cursor = ok(client.get("/api/search", params={"q": "a square", "k": 5}))["next_cursor"]
        write_image(dated.parent / "photos" / "new.jpg", (0, 0, 0), seed=99)
        build = ["build", str(dated.parent / "photos"), "--index-dir", str(dated), "--model", str(app_model)]
        assert clip_index([*build, "--workers", "0"]) == 0
        client.app.state.runtime.refresh()  # type: ignore[attr-defined]
        stale = client.get("/api/search", params={"q": "a square", "k": 5, "cursor": cursor})
        assert stale.status_code == 409 and "search again" in stale.json()["detail"]


def test_an_edited_cursor_is_refused(client: TestClient) -> None:
    cursor = ok(client.get("/api/search", params={"q": "a red square", "k": 3}))["next_cursor"]
    assert isinstance(cursor, str)
    fields = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    for edit in ({"o": 6}, {"o": 0}, {"o": True}, {"g": "g-999999"}, {"v": 1}):
        edited = base64.urlsafe_b64encode(json.dumps({**fields, **edit}).encode()).decode()
        response = client.get("/api/search", params={"q": "a red square", "k": 3, "cursor": edited})
        assert response.status_code == 422 and "cursor is not one this server gave out" in response.json()["detail"]


@pytest.mark.parametrize(
    "token",
    [
        base64.urlsafe_b64encode(b"[" * 3000 + b"]" * 3000).decode(),  # nested past the parser's recursion limit
        base64.urlsafe_b64encode(b'"a string"').decode(),
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        "\u00e9t\u00e9",
    ],
)
def test_a_token_that_is_no_cursor_is_a_422(client: TestClient, token: str) -> None:
    with pytest.raises(BadRequestError, match="cursor is not one this server gave out"):
        Cursor.decode(token)
    response = client.get("/api/search", params={"q": "a red square", "cursor": token})
    assert response.status_code == 422 and "cursor is not one this server gave out" in response.text


def test_a_cursor_carries_a_folder_of_the_longest_kind_within_the_limit() -> None:
    folder = "\U0001f4f7" * TEXT_FIELD_MAX + "\udc80"  # 4 UTF-8 bytes each, and a lone surrogate from a file name
    cursor = Cursor("g-000001", 50, "abc", {"threshold": 0.995, "folder": folder})
    token = cursor.encode()
    assert len(token) <= MAX_CURSOR_CHARS and Cursor.decode(token) == cursor


RESULT_PARAMETERS = {"k", "min_score", "min_relevance", "sort", "cursor", "folder", "taken_after", "taken_before",
                     "camera", "format", "min_width", "min_height", "orientation"}  # fmt: skip


def test_every_image_search_takes_the_same_result_options(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, method in (
        ("/api/search", "get"),
        ("/api/search/image", "post"),
        ("/api/images/{image_id}/similar", "get"),
    ):
        parameters = spec["paths"][path][method]["parameters"]
        assert {p["name"] for p in parameters if p["in"] == "query"} >= RESULT_PARAMETERS, path
    body = spec["components"]["schemas"]["CombinedQuery"]["properties"]
    assert set(body) >= {"k", "min_score", "min_relevance", "sort", "cursor", "filters"}
    first = ok(client.get("/api/search", params={"q": "a red square", "k": 1}))["results"][0]["id"]  # type: ignore[index]
    refused = client.get(f"/api/images/{first}/similar", params={"min_relevance": 0.5})
    assert refused.status_code == 422 and "text queries" in refused.json()["detail"]
