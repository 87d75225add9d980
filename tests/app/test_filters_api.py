"""Metadata filters through the HTTP API: every image search (text, upload, similar, combined) takes them, as query
parameters or in the JSON body, and refuses bad ones with a 422 that says what to change (unknown folders, cameras
and formats alike in searches and duplicates, with the close known values); GET /api/facets lists what the index
holds."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from tests.app.conftest import COLOURS, IndexedFolder
from tests.app.photo_library import PhotoLibrary, build_photo_library


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


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, app_model: Path) -> PhotoLibrary:
    return build_photo_library(tmp_path_factory.mktemp("library"), app_model)


@pytest.fixture(scope="module")
def photos(library: PhotoLibrary, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app over ``library``."""
    settings = Settings(index_dir=library.index_dir, cache_dir=tmp_path_factory.mktemp("library-cache"))
    with TestClient(create_app(settings, watch=False)) as test_client:
        yield test_client


def test_facets_list_what_the_index_holds(photos: TestClient, library: PhotoLibrary) -> None:
    body = photos.get("/api/facets").json()
    folders = {f["value"]: f["images"] for f in body["folders"]}
    assert folders == {
        "2019": 5, "2019/Lisbon": 5, "2023": 10, "2023/Garden": 4, "2023/Holidays": 6, "backup": 1, "scans": 3,
    }  # fmt: skip
    assert list(folders) == sorted(folders)
    cameras = [(c["value"], c["images"]) for c in body["cameras"]]
    assert cameras == [("Apple iPhone 12", 7), ("Canon EOS 5D", 5), ("FUJIFILM X100V", 4)]
    assert {f["value"]: f["images"] for f in body["formats"]} == {"jpeg": 16, "png": 3}
    assert (body["folders_matched"], body["folders_truncated"]) == (7, False)  # the first page is all of them
    assert body["taken"] == {"earliest": "2010-01-01T12:00:00", "latest": "2023-07-15T14:15:00", "from_exif": 16}
    assert (body["images"], body["generation"]) == (len(library.photos), photos.get("/readyz").json()["generation"])


def test_facets_of_an_index_without_metadata(client: TestClient, indexed: IndexedFolder) -> None:
    body = client.get("/api/facets").json()
    assert [f["value"] for f in body["folders"]] == ["blue", "green", "red", "yellow"]
    assert body["cameras"] == [] and body["taken"]["from_exif"] == 0
    response = client.get("/api/search", params={"q": "x", "camera": "canon"})
    assert response.status_code == 422
    assert (
        response.json()["detail"] == "unknown camera 'canon': no indexed image has a camera make or model in its EXIF"
    )


@pytest.mark.parametrize(
    "conditions",
    [
        {"folder": "2023"},
        {"folder": "2023/Holidays"},
        {"camera": "iphone"},
        {"camera": "canon eos"},
        {"taken_after": "2023-01-01"},
        {"taken_after": "2019-05-02", "taken_before": "2019-05-04"},
        {"taken_before": "2011-01-01"},
        {"folder": "2023", "camera": "fujifilm", "taken_after": "2023-04-02T00:00:00"},
    ],
)
def test_filters_narrow_the_results_to_the_photos_they_describe(
    photos: TestClient, library: PhotoLibrary, conditions: dict[str, str]
) -> None:
    found = set(paths_of(photos.get("/api/search", params={"q": "a photo", "k": 100, **conditions})))
    expected = library.paths(
        conditions.get("folder", ""),
        conditions.get("camera", ""),
        conditions.get("taken_after", ""),
        conditions.get("taken_before", ""),
    )
    assert found == expected and expected


def test_known_values_that_match_nothing_together_are_an_empty_page(photos: TestClient) -> None:
    for conditions in (
        {"folder": "2019", "camera": "iphone"},
        {"camera": "canon", "taken_after": "2020-01-01"},
        {"taken_after": "1990-01-01", "taken_before": "1990-01-02"},
    ):
        response = photos.get("/api/search", params={"q": "a photo", **conditions})
        assert response.status_code == 200 and response.json()["results"] == []
        assert response.json()["next_cursor"] is None


@pytest.mark.parametrize(
    ("conditions", "detail"),
    [
        ({"folder": "2023/holidays"}, "unknown folder '2023/holidays': no indexed image matches it (did you mean "
         "'2023/Holidays'? GET /api/facets lists them all)"),
        ({"folder": "Holidays"}, "did you mean '2023/Holidays'?"),
        ({"folder": "2023/Hol"}, "unknown folder '2023/Hol'"),
        ({"camera": "nikon"}, "unknown camera 'nikon': no indexed image matches it (GET /api/facets lists them all)"),
        ({"camera": "iphone 13"}, "did you mean 'Apple iPhone 12'?"),
        ({"format": "jpg"}, "unknown format 'jpg': no indexed image matches it (did you mean 'jpeg'"),
    ],
)  # fmt: skip
def test_unknown_folders_cameras_and_formats_are_422s_that_name_close_ones(
    photos: TestClient, conditions: dict[str, str], detail: str
) -> None:
    response = photos.get("/api/search", params={"q": "a photo", **conditions})
    assert response.status_code == 422 and detail in response.json()["detail"]


def test_every_search_and_the_duplicates_refuse_an_unknown_folder_alike(photos: TestClient) -> None:
    data = io.BytesIO()
    Image.new("RGB", (64, 64), COLOURS["green"]).save(data, "PNG")
    first = photos.get("/api/search", params={"q": "a photo", "k": 1}).json()["results"][0]["id"]
    body = {"parts": [{"text": "a photo"}], "filters": {"folder": ["2023/holidays"]}}
    responses = [
        photos.get("/api/search", params={"q": "a photo", "folder": "2023/holidays"}),
        photos.post(
            "/api/search/image", params={"folder": "2023/holidays"}, files={"file": ("g.png", data.getvalue())}
        ),
        photos.get(f"/api/images/{first}/similar", params={"folder": "2023/holidays"}),
        photos.post("/api/search/combined", json=body),
        photos.get("/api/duplicates", params={"folder": "2023/holidays"}),
    ]
    details = {(r.status_code, r.json()["detail"]) for r in responses}
    assert details == {(422, "unknown folder '2023/holidays': no indexed image matches it (did you mean "
                             "'2023/Holidays'? GET /api/facets lists them all)")}  # fmt: skip


def test_several_unknown_values_are_named_in_one_refusal(photos: TestClient) -> None:
    params = [("q", "x"), ("folder", "2019"), ("folder", "1999"), ("camera", "leica"), ("format", "gif")]
    detail = photos.get("/api/search", params=params).json()["detail"]
    assert [part.split(":")[0] for part in detail.split("; ")] == [
        "unknown folder '1999'", "unknown camera 'leica'", "unknown format 'gif'",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("conditions", "detail"),
    [
        ({"taken_after": "2023-06-01", "taken_before": "2023-05-01"}, "taken_before must be later than taken_after"),
        ({"taken_after": "2023-06-01", "taken_before": "2023-06-01"}, "for the single day 2024-06-01"),
        ({"taken_after": "2023-06-01T10:00:00+02:00", "taken_before": "2023-06-01T09:00:00Z"}, "must be later"),
        ({"taken_after": "2023-02-30"}, "day value is outside expected range"),
        ({"taken_before": "June 2023"}, "must be an ISO 8601 date or datetime, such as 2024-06-01"),
        ({"taken_after": "1700000000"}, "must be an ISO 8601 date or datetime"),
        ({"taken_before": "10000-01-01"}, "of a year from 0001 to 9999 (for an open end, leave the parameter out"),
        ({"taken_before": "+010000-01"}, "of a year from 0001 to 9999"),  # JavaScript's day after 9999-12-31, cut
        ({"taken_after": "0000-12-31"}, "year 0 is out of range"),
    ],
)
def test_malformed_dates_and_inverted_ranges_are_422s_that_say_what_to_change(
    photos: TestClient, conditions: dict[str, str], detail: str
) -> None:
    response = photos.get("/api/search", params={"q": "a photo", **conditions})
    assert response.status_code == 422 and detail in response.text
    body = {"parts": [{"text": "a photo"}], "filters": conditions}
    response = photos.post("/api/search/combined", json=body)
    assert response.status_code == 422 and detail in response.text


@pytest.mark.parametrize(
    "conditions",
    [
        {"taken_before": "9999-12-31"},  # what date pickers send for "no end"
        {"taken_after": "0001-01-01"},
        {"taken_after": "0001-01-01", "taken_before": "9999-12-31"},
        {"taken_after": "0001-01-01T00:00:00+14:00", "taken_before": "9999-12-31T23:59:59.999999-12:00"},
        {"taken_after": "2019-05-03", "taken_before": "9999-12-31"},
        {"taken_after": "0001-01-01", "taken_before": "2019-05-03"},
    ],
)
def test_the_first_and_last_dates_there_are_are_open_ends_in_every_search(
    photos: TestClient, library: PhotoLibrary, conditions: dict[str, str]
) -> None:
    expected = library.paths(
        after=conditions.get("taken_after", "")[:10], before=conditions.get("taken_before", "")[:10]
    )
    assert expected
    search = {"q": "a photo", "k": 100, **conditions}
    assert set(paths_of(photos.get("/api/search", params=search))) == expected
    body = {"parts": [{"text": "a photo"}], "k": 100, "filters": conditions}
    assert set(paths_of(photos.post("/api/search/combined", json=body))) == expected
    first = photos.get("/api/search", params={"q": "a photo", "k": 1}).json()["results"][0]
    similar = set(paths_of(photos.get(f"/api/images/{first['id']}/similar", params={"k": 100, **conditions})))
    assert similar == expected - {first["path"]}
    data = io.BytesIO()
    Image.new("RGB", (64, 64), COLOURS["green"]).save(data, "PNG")
    upload = photos.post(
        "/api/search/image", params={"k": 100, **conditions}, files={"file": ("g.png", data.getvalue())}
    )
    assert set(paths_of(upload)) == expected


def test_far_dates_page_by_capture_time_and_match_nothing_beyond_the_photos(photos: TestClient) -> None:
    params = {"q": "a photo", "k": 5, "sort": "oldest", "taken_after": "0001-01-01", "taken_before": "9999-12-31"}
    taken: list[str] = []
    cursor: dict[str, str] = {}
    while True:
        page = photos.get("/api/search", params={**params, **cursor}).json()
        taken += [hit["taken_at"] for hit in page["results"]]
        if page["next_cursor"] is None:
            break
        cursor = {"cursor": page["next_cursor"]}
    assert len(taken) == 19 and taken == sorted(taken)
    for conditions in ({"taken_after": "9999-12-31"}, {"taken_before": "0001-01-02"}):
        assert paths_of(photos.get("/api/search", params={"q": "a photo", **conditions})) == []
