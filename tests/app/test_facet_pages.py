"""GET /api/facets over a library of ten years of event folders (more than one page of them): folders a page at a
time in path order (``limit``, ``folder_after``), those starting with a prefix ignoring case (``folder_prefix``), how
many match in all; bad paging parameters are 422s; filters still take, and refusals still name, folders beyond the
first page."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.facet_schemas import DEFAULT_FOLDER_LIMIT
from app.main import create_app
from app.settings import Settings
from indexer.cli import main as clip_index
from tests.app.conftest import write_image

YEARS = range(2014, 2024)
EVENTS = ("Beach", "birthday", "Garden", "Hike", "Lisbon")  # mixed case: prefixes match ignoring it
MONTHS = range(1, 6)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, app_model: Path) -> tuple[Path, list[str]]:
    """(index directory, folders in path order) of a library of one photo per event folder ("2019/2019-03 Hike"), with
    the years above them: 260 folders, more than the default page of 200."""
    base = tmp_path_factory.mktemp("years")
    root = base / "photos"
    seed = 0
    for year in YEARS:
        for month in MONTHS:
            for event in EVENTS:
                seed += 1
                write_image(
                    root / f"{year}" / f"{year}-{month:02d} {event}" / "IMG_0001.png", (90, 90, 90), seed, (8, 8)
                )
    command = ["build", str(root), "--index-dir", str(base / "index"), "--model", str(app_model), "--workers", "0"]
    assert clip_index(command) == 0
    events = {path.parent.relative_to(root).as_posix() for path in root.rglob("*.png")}
    return base / "index", sorted({str(year) for year in YEARS} | events)


@pytest.fixture(scope="module")
def folders(library: tuple[Path, list[str]]) -> list[str]:
    return library[1]


@pytest.fixture(scope="module")
def years(library: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app over ``library``."""
    settings = Settings(index_dir=library[0], cache_dir=tmp_path_factory.mktemp("years-cache"))
    with TestClient(create_app(settings, watch=False)) as test_client:
        yield test_client


def facets(client: TestClient, **params: str | int) -> dict:
    response = client.get("/api/facets", params=params)
    assert response.status_code == 200, response.text
    body: dict = response.json()
    return body


def test_the_first_page_lists_the_first_folders_in_path_order_and_how_many_there_are(
    years: TestClient, folders: list[str]
) -> None:
    assert len(folders) == 260 > DEFAULT_FOLDER_LIMIT
    body = facets(years)
    assert [f["value"] for f in body["folders"]] == folders[:DEFAULT_FOLDER_LIMIT]
    assert (body["folders_matched"], body["folders_truncated"]) == (260, True)
    assert body["folders"][0] == {"value": "2014", "images": 25}
    assert body["formats"] == [{"value": "png", "images": 250}]  # cameras and formats whole, as before


def test_folder_after_pages_through_every_folder_once(years: TestClient, folders: list[str]) -> None:
    listed: list[str] = []
    after: dict[str, str] = {}
    while True:
        body = facets(years, limit=64, **after)
        listed += [f["value"] for f in body["folders"]]
        assert body["folders_matched"] == 260
        if not body["folders_truncated"]:
            break
        after = {"folder_after": listed[-1]}
    assert listed == folders and len(listed) // 64 == 4  # 5 pages, the last of 4
    assert facets(years, folder_after=folders[-1])["folders"] == []  # "2023/2023-05 birthday": path (code point) order
    assert [f["value"] for f in facets(years, folder_after="2016/2016-05 c", limit=2)["folders"]] == [
        "2017",
        "2017/2017-01 Beach",
    ]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("2019/2019-03", ["2019/2019-03 Beach", "2019/2019-03 Garden", "2019/2019-03 Hike", "2019/2019-03 Lisbon",
                          "2019/2019-03 birthday"]),  # path (code point) order
        ("2019/2019-03 b", ["2019/2019-03 Beach", "2019/2019-03 birthday"]),  # ignoring case
        ("/2019/2019-03 LIS", ["2019/2019-03 Lisbon"]),  # and a leading "/"
        ("2014", None),  # 2014 and its 25 events
        ("2014/", None),  # its events only
        ("1999", []),
        ("2019/2019-03 Lisbon/", []),
    ],
)  # fmt: skip
def test_a_prefix_lists_the_folders_whose_path_starts_with_it(
    years: TestClient, folders: list[str], prefix: str, expected: list[str] | None
) -> None:
    if expected is None:
        expected = [f for f in folders if f.casefold().startswith(prefix.casefold())]
        assert len(expected) in (25, 26)
    body = facets(years, folder_prefix=prefix)
    assert [f["value"] for f in body["folders"]] == expected
    assert (body["folders_matched"], body["folders_truncated"]) == (len(expected), False)


def test_a_prefix_pages_like_the_whole_list(years: TestClient, folders: list[str]) -> None:
    body = facets(years, folder_prefix="2019/", limit=10)
    assert [f["value"] for f in body["folders"]] == [f for f in folders if f.startswith("2019/")][:10]
    assert (body["folders_matched"], body["folders_truncated"]) == (25, True)
    rest = facets(years, folder_prefix="2019/", folder_after=body["folders"][-1]["value"], limit=1000)
    assert [f["value"] for f in body["folders"] + rest["folders"]] == [f for f in folders if f.startswith("2019/")]
    assert (rest["folders_matched"], rest["folders_truncated"]) == (25, False)
    assert facets(years, folder_prefix="2", limit=1000)["folders_truncated"] is False


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"limit": 0}, "greater than or equal to 1"),
        ({"limit": 1001}, "less than or equal to 1000"),
        ({"limit": "1.0"}, "must be a plain decimal integer"),
        ({"folder_prefix": "x" * 1001}, "at most 1000 characters"),
        ({"folder_after": "x" * 1001}, "at most 1000 characters"),
    ],
)
def test_bad_paging_parameters_are_422s_that_name_the_range(
    years: TestClient, params: dict[str, str | int], detail: str
) -> None:
    response = years.get("/api/facets", params=params)
    assert response.status_code == 422 and detail in response.text, response.text


def test_filters_take_and_refusals_name_folders_beyond_the_first_page(years: TestClient, folders: list[str]) -> None:
    late = "2023/2023-05 Lisbon"
    assert late not in folders[:DEFAULT_FOLDER_LIMIT]
    response = years.get("/api/search", params={"q": "a photo", "folder": late})
    assert response.status_code == 200 and [h["path"] for h in response.json()["results"]] == [f"{late}/IMG_0001.png"]
    response = years.get("/api/search", params={"q": "a photo", "folder": "2023/2023-05 Lisbn"})
    assert response.status_code == 422
    assert "did you mean '2023/2023-05 Lisbon'" in response.json()["detail"], response.text
