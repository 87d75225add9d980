"""Metadata filters through the HTTP API: every image search (text, upload, similar, combined) takes them, as query
parameters or in the JSON body, and refuses bad ones with a 422."""

from __future__ import annotations

import io

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.app.conftest import COLOURS, IndexedFolder


def paths_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [hit["path"] for hit in response.json()["results"]]


def test_text_search_with_folder_format_and_date_filters(client: TestClient, indexed: IndexedFolder) -> None:
    everything = paths_of(client.get("/api/search", params={"q": "a red square", "k": 50}))
    assert len(everything) == len(indexed.files)
    blue = paths_of(client.get("/api/search", params={"q": "a red square", "k": 50, "folder": "blue"}))
    assert sorted(blue) == sorted(p for p in indexed.files if p.startswith("blue/"))
    two = paths_of(client.get("/api/search", params=[("q", "a red square"), ("folder", "blue"), ("folder", "red")]))
    assert {p.split("/")[0] for p in two} == {"blue", "red"} and len(two) == 6
    pngs = paths_of(client.get("/api/search", params={"q": "a red square", "format": "PNG"}))
    assert sorted(pngs) == sorted(p for p in indexed.files if p.endswith(".png"))
    # no file has EXIF: capture time is the file's mtime, written by this test session
    assert paths_of(client.get("/api/search", params={"q": "x", "taken_before": "2000-01-01"})) == []
    assert len(paths_of(client.get("/api/search", params={"q": "x", "taken_after": "2000-01-01", "k": 50}))) == 12
    assert paths_of(client.get("/api/search", params={"q": "x", "orientation": "portrait"})) == []  # all 120 x 80
    assert len(paths_of(client.get("/api/search", params={"q": "x", "orientation": "landscape", "k": 50}))) == 12
    assert paths_of(client.get("/api/search", params={"q": "x", "min_width": 121})) == []


def test_every_image_search_takes_the_filters(client: TestClient, indexed: IndexedFolder) -> None:
    data = io.BytesIO()
    Image.new("RGB", (64, 64), COLOURS["green"]).save(data, "PNG")
    upload = client.post("/api/search/image", params={"folder": "green"}, files={"file": ("g.png", data.getvalue())})
    assert {p.split("/")[0] for p in paths_of(upload)} == {"green"}
    first = client.get("/api/search", params={"q": "a red square", "folder": "red"}).json()["results"][0]["id"]
    similar = client.get(f"/api/images/{first}/similar", params={"folder": "yellow", "k": 50})
    assert {p.split("/")[0] for p in paths_of(similar)} == {"yellow"}
    body = {"parts": [{"text": "a red square"}], "k": 50, "filters": {"folder": ["red"], "format": ["webp"]}}
    combined = paths_of(client.post("/api/search/combined", json=body))
    assert combined == ["red/red_2.webp"]


@pytest.mark.parametrize(
    "params",
    [
        {"orientation": "sideways"},
        {"min_width": "0"},
        {"min_height": "1.5"},
        {"taken_after": "yesterday"},
        {"folder": "x" * 1001},
    ],
)
def test_bad_filters_are_422(client: TestClient, params: dict[str, str]) -> None:
    response = client.get("/api/search", params={"q": "x", **params})
    assert response.status_code == 422, response.text


def test_a_body_filter_with_an_unknown_field_is_422(client: TestClient) -> None:
    body = {"parts": [{"text": "x"}], "filters": {"colour": "red"}}
    assert client.post("/api/search/combined", json=body).status_code == 422
