"""The web page in a real browser (Debian's Chromium driven by Playwright) against the real server process: search by
text and image, more like this, labels, the API key prompt, errors; over a photo library with metadata, the filters
(the far ends of the date range too), the order toggle, endless scrolling through pages, a stale cursor, and the
duplicates view; over more folders than one answer lists, the folder suggestions fetched as one types.

Skipped where ``/usr/bin/chromium`` or Playwright is missing, unless ``CLIPSEARCH_REQUIRE_BROWSER=1`` (CI), which
makes that a failure. ``CLIPSEARCH_SCREENSHOT_DIR``, if set, receives a copy of the search screenshot.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import clip_model
from app.relevance import DEFAULT_MIN_RELEVANCE, SIGMOID_MIN_RELEVANCE
from tests.app import test_facet_pages
from tests.app.conftest import IndexedFolder, LiveServer, start_server, stop_server
from tests.app.photo_library import PhotoLibrary, build_photo_library

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Error, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 10_000
UPLOADED = "green/green_1.png"  # any indexed file: its own embedding scores 1.0 against itself
ALL_THUMBNAILS_LOADED = """() => {
    const images = [...document.querySelectorAll('.result img')];
    return images.length > 0 && images.every((image) => image.complete && image.naturalWidth > 0);
}"""
TEST_KEY = "browser-test-key"
FOLDER_LIMIT = 50  # folders the page offers at a time (app.js)
FOLDER_OPTIONS = "list => [...list.options].map(option => option.value)"

_errors: list[str] = []  # console errors and uncaught page errors, from every page of this module


def _no_browser(reason: str) -> None:
    if os.environ.get("CLIPSEARCH_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and CLIPSEARCH_REQUIRE_BROWSER=1 requires the browser tests to run")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        _no_browser(f"{CHROMIUM} is not installed")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("the playwright package is not installed")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def _open(browser: Browser, url: str, expected: tuple[str, ...] = (), width: int = 1280, height: int = 900) -> Page:
    """A fresh page at ``url`` that records console errors (except those matching ``expected``) and page errors."""

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and not any(re.search(pattern, message.text) for pattern in expected):
            _errors.append(f"console: {message.text} ({message.location.get('url')})")

    def on_page_error(error: Error) -> None:
        _errors.append(f"pageerror: {error.message}")

    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    page.goto(url)
    return page


@pytest.fixture
def page(browser: Browser, live_server: LiveServer) -> Iterator[Page]:
    page = _open(browser, live_server.url)
    yield page
    page.close()


def _search(page: Page, query: str, k: int | None = None, only_relevant: bool = False) -> None:
    """Search for ``query``; the tiny random model finds nothing relevant, so the cut-off is off unless asked."""
    from playwright.sync_api import expect

    if k is not None:
        page.fill("#k", str(k))
    page.set_checked("#relevant", only_relevant)
    page.fill("#query", query)
    page.click("#search-form button[type=submit]")
    expect(page.locator("#results-heading")).to_have_text(f"Results for \u201c{query}\u201d")
    page.wait_for_function(ALL_THUMBNAILS_LOADED)


def _screenshot(page: Page, path: Path) -> Path:
    """A full-page PNG at ``path``, copied into ``CLIPSEARCH_SCREENSHOT_DIR`` when that is set."""
    page.screenshot(path=str(path), full_page=True)
    if directory := os.environ.get("CLIPSEARCH_SCREENSHOT_DIR"):
        Path(directory).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(directory) / path.name)
    return path


def test_text_search_shows_loaded_thumbnails(page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#status")).to_contain_text("12 images indexed (generation g-")
    k = 8
    with page.expect_request(lambda request: "/api/search?" in request.url) as sent:
        _search(page, "a red square", k=k)
    assert "k=8" in sent.value.url and "cursor" not in sent.value.url

    # the first page does not fill the viewport, so the next one follows: 12 results in pages of 8
    expect(page.locator("#more")).to_have_text("No more results.")
    page.wait_for_function(ALL_THUMBNAILS_LOADED)
    results = page.locator(".result")
    assert results.count() == 12
    widths = page.eval_on_selector_all(".result img", "images => images.map(image => image.naturalWidth)")
    assert widths and all(width > 0 for width in widths)
    scores = [float(text) for text in results.locator(".score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    assert all(re.fullmatch(r"-?\d\.\d{3}", text) for text in results.locator(".score").all_inner_texts())
    expect(page.locator("#status")).to_contain_text(f"{results.count()} results")

    data = _screenshot(page, tmp_path / "search.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def test_only_relevant_is_on_by_default_and_asks_the_server_for_its_cut_off(page: Page) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#relevant")).to_be_checked()
    page.fill("#query", "a red square")
    with page.expect_request(lambda request: "/api/search?" in request.url) as sent:
        page.click("#search-form button[type=submit]")
    assert f"min_relevance={DEFAULT_MIN_RELEVANCE}" in sent.value.url  # the page's cut-off is the documented one
    expect(page.locator("#results-heading")).to_have_text("Results for \u201ca red square\u201d")
    if page.locator(".result").count() == 0:  # the tiny random model: nothing stands out from unrelated queries
        expect(page.locator("#status")).to_contain_text("only relevant")
    page.uncheck("#relevant")
    with page.expect_request(lambda request: "/api/search?" in request.url) as sent:
        page.click("#search-form button[type=submit]")
    assert "min_relevance" not in sent.value.url
    page.wait_for_function(ALL_THUMBNAILS_LOADED)
    assert page.locator(".result").count() > 0


def test_only_relevant_uses_the_served_models_own_cut_off(browser: Browser, live_server: LiveServer) -> None:
    """A SigLIP's relevance is its own probability, cut at 0.1: the page sends what /api/stats says, not 0.99."""
    from playwright.sync_api import Route, expect

    def sigmoid_model(route: Route) -> None:
        body = route.fetch().json()
        assert (body["relevance_kind"], body["default_min_relevance"]) == ("calibrated", DEFAULT_MIN_RELEVANCE)
        route.fulfill(json={**body, "relevance_kind": "sigmoid", "default_min_relevance": SIGMOID_MIN_RELEVANCE})

    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.route("**/api/stats", sigmoid_model)
    page.goto(live_server.url)
    expect(page.locator("#status")).to_contain_text("images indexed")
    page.fill("#query", "a red square")
    with page.expect_request(lambda request: "/api/search?" in request.url) as sent:
        page.click("#search-form button[type=submit]")
    assert f"min_relevance={SIGMOID_MIN_RELEVANCE}" in sent.value.url
    page.close()


def test_a_long_query_is_cut_by_default_and_read_in_parts_on_request(page: Page, indexed: IndexedFolder) -> None:
    from playwright.sync_api import expect

    query = ("a red square on a green lawn beside a blue pond under a yellow sun at noon " * 6).strip()
    parts = len(clip_model.TextInput.of(clip_model.load(indexed.model)[0]).windows(query))
    assert len(query) < 1000 and parts > 1  # fits the query box, not the tiny model's context
    status = page.locator("#status")
    expect(page.locator("#long-text")).to_have_value("")
    with page.expect_request(lambda request: "/api/search?" in request.url) as sent:
        _search(page, query)
    assert "long_text" not in sent.value.url  # the server's setting, truncate here
    expect(status).to_contain_text("was longer than the model's context and was cut")
    expect(status).not_to_contain_text("parts")

    with page.expect_request(lambda request: "/api/search?" in request.url) as sent:
        page.select_option("#long-text", "chunk")  # the text search shown runs again
    assert "long_text=chunk" in sent.value.url
    expect(status).to_contain_text(f"Read in {parts} parts.")
    expect(status).not_to_contain_text("was cut")

    with page.expect_request(lambda request: "/api/search?" in request.url) as sent:
        page.select_option("#long-text", "truncate")
    assert "long_text=truncate" in sent.value.url
    expect(status).to_contain_text("was cut")
    expect(status).not_to_contain_text("parts")


def test_uploaded_image_finds_itself_first(page: Page, indexed: IndexedFolder) -> None:
    from playwright.sync_api import expect

    page.set_input_files("#upload", str(indexed.files[UPLOADED]))

    expect(page.locator("#results-heading")).to_have_text(f"Similar to {Path(UPLOADED).name}")
    page.wait_for_function(ALL_THUMBNAILS_LOADED)
    top = page.locator(".result").first
    assert UPLOADED in (top.get_attribute("title") or "")
    expect(top.locator(".path")).to_have_text(UPLOADED)
    assert float(top.locator(".score").inner_text()) >= 0.999
    preview = page.locator("#upload-preview")
    expect(preview).to_be_visible()
    assert preview.evaluate("image => image.naturalWidth") > 0


def test_dropped_image_searches_by_it(page: Page, indexed: IndexedFolder) -> None:
    from playwright.sync_api import expect

    data = base64.b64encode(indexed.files[UPLOADED].read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([data, name]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "image/png" }));
            return transfer;
        }""",
        [data, Path(UPLOADED).name],
    )
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})

    expect(page.locator("#results-heading")).to_have_text(f"Similar to {Path(UPLOADED).name}")
    expect(page.locator(".result .path").first).to_have_text(UPLOADED)


def test_more_like_this_and_zero_shot_labels(page: Page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    _search(page, "a blue square")
    clicked = page.locator(".result").first
    image_id, path = clicked.get_attribute("data-id"), clicked.locator(".path").inner_text()
    clicked.click()

    expect(page.locator("#results-heading")).to_have_text(f"More like {path}")
    page.wait_for_function(ALL_THUMBNAILS_LOADED)
    assert page.locator(".result").count() >= 1
    assert page.locator(f'.result[data-id="{image_id}"]').count() == 0
    expect(page.locator("#selected-path")).to_have_text(path)
    assert (page.get_attribute("#selected-original", "href") or "").endswith(f"/api/images/{image_id}/file")
    page.wait_for_function("() => document.getElementById('selected-image').naturalWidth > 0")

    labels = ["a photo", "a drawing", "a screenshot"]
    page.fill("#labels", ", ".join(labels))
    page.click("#classify")
    rows = page.locator("#labels-result .label-row")
    expect(rows).to_have_count(len(labels))
    assert sorted(rows.locator(".label-name").all_inner_texts()) == sorted(labels)
    percents = [float(text.rstrip("%")) for text in rows.locator(".label-percent").all_inner_texts()]
    assert sum(percents) == pytest.approx(100.0, abs=0.3)
    assert percents == sorted(percents, reverse=True)
    _screenshot(page, tmp_path / "similar.png")


def test_error_bodies_and_empty_results_are_shown(browser: Browser, live_server: LiveServer) -> None:
    """Both error body forms (string ``detail``, FastAPI's validation list) and "No results", with canned answers."""
    from playwright.sync_api import Route, expect

    answers = iter(
        [
            (422, {"detail": [{"loc": ["query", "k"], "msg": "Input should be less than or equal to 1000"}]}),
            (503, {"detail": "the inference queue is full: retry shortly"}),
            (200, {"results": [], "generation": "g-000002", "took_ms": 1.0, "truncated": False}),
        ]
    )

    def answer(route: Route) -> None:
        status, body = next(answers)
        route.fulfill(status=status, json=body)

    page = _open(browser, live_server.url, expected=(r"status of (422|503)",))
    expect(page.locator("#status")).to_contain_text("12 images indexed")
    page.route("**/api/search?*", answer)
    status = page.locator("#status")
    for expected in ("Error: k: Input should be less than or equal to 1000", "Error: the inference queue is full"):
        page.fill("#query", "anything")
        page.click("#search-form button[type=submit]")
        expect(status).to_contain_text(expected)
    page.click("#search-form button[type=submit]")  # "only relevant" is on: the message says how to see more
    expect(status).to_have_text(
        "No results. Nothing indexed looks relevant: untick \u201conly relevant\u201d to see the closest."
    )
    expect(page.locator(".result")).to_have_count(0)
    page.close()


def test_api_key_is_asked_for_and_sent(browser: Browser, indexed: IndexedFolder, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    server = start_server(indexed.index_dir, tmp_path, {"CLIPSEARCH_API_KEY": TEST_KEY})
    try:
        page = _open(browser, server.url, expected=(r"status of 401",))  # the browser logs the refused request
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#status")).to_contain_text("API key")
        page.fill("#api-key", TEST_KEY)
        page.click("#key-form button[type=submit]")
        expect(page.locator("#status")).to_contain_text("12 images indexed")
        expect(page.locator("#key-form")).to_be_hidden()
        _search(page, "a yellow square", k=3)  # thumbnails load only with ?api_key=
        assert page.evaluate("() => localStorage.getItem('clipsearch.apiKey')") == TEST_KEY
        page.close()
    finally:
        stop_server(server)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, app_model: Path) -> PhotoLibrary:
    return build_photo_library(tmp_path_factory.mktemp("library"), app_model)


@pytest.fixture(scope="module")
def library_server(library: PhotoLibrary, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The server over the photo library (folders, cameras, capture dates, a copy)."""
    server = start_server(library.index_dir, tmp_path_factory.mktemp("library-live"))
    yield server
    stop_server(server)


def _open_library(browser: Browser, server: LiveServer, expected: tuple[str, ...] = (), **viewport: int) -> Page:
    """A page over the library, once its status and the facets (the camera choices) are loaded."""
    from playwright.sync_api import expect

    page = _open(browser, server.url, expected, **viewport)
    expect(page.locator("#status")).to_contain_text("19 images indexed")
    expect(page.locator("#camera option")).to_have_count(4)
    return page


def _paths(page: Page) -> list[str]:
    return page.locator(".result .path").all_inner_texts()


def test_filters_offer_what_the_index_holds_and_narrow_the_results(
    browser: Browser, library_server: LiveServer, library: PhotoLibrary
) -> None:
    from playwright.sync_api import expect

    page = _open_library(browser, library_server)
    cameras = page.locator("#camera option").all_inner_texts()
    assert cameras == ["Any camera", "Apple iPhone 12 (7)", "Canon EOS 5D (5)", "FUJIFILM X100V (4)"]
    folders = page.eval_on_selector_all("#folder-list option", "options => options.map(option => option.value)")
    assert folders == ["2019", "2019/Lisbon", "2023", "2023/Garden", "2023/Holidays", "backup", "scans"]
    assert (page.get_attribute("#taken-from", "min"), page.get_attribute("#taken-to", "max")) == (
        "2010-01-01",
        "2023-07-15",
    )

    page.fill("#folder", "2023/Holidays")
    _search(page, "a photo", k=50)
    assert sorted(_paths(page)) == sorted(library.paths(folder="2023/Holidays"))

    # a changed filter runs the search again
    page.fill("#folder", "")
    with page.expect_request(lambda request: "camera=Canon+EOS+5D" in request.url):
        page.select_option("#camera", "Canon EOS 5D")
    expect(page.locator(".result")).to_have_count(5)
    assert sorted(_paths(page)) == sorted(library.paths(camera="Canon EOS 5D"))

    # the "to" date is included: the request asks for captures before the day after it
    page.select_option("#camera", "")
    page.fill("#taken-from", "2023-07-11")
    with page.expect_request(lambda request: "taken_before=2023-07-13" in request.url) as sent:
        page.fill("#taken-to", "2023-07-12")
        page.dispatch_event("#taken-to", "change")
    assert "taken_after=2023-07-11" in sent.value.url
    expect(page.locator(".result")).to_have_count(2)
    assert sorted(_paths(page)) == sorted(library.paths(after="2023-07-11", before="2023-07-13"))
    assert sorted(page.locator(".result .taken").all_inner_texts()) == ["2023-07-11", "2023-07-12"]

    page.click("#clear-filters")
    expect(page.locator(".result")).to_have_count(len(library.photos))
    page.close()


def test_bad_filters_are_explained(browser: Browser, library_server: LiveServer) -> None:
    from playwright.sync_api import expect

    page = _open_library(browser, library_server, expected=(r"status of 422",))
    page.set_checked("#relevant", False)
    page.fill("#query", "a photo")
    page.fill("#folder", "2023/holidays")
    page.click("#search-form button[type=submit]")
    expect(page.locator("#status")).to_have_text(
        "Error: unknown folder '2023/holidays': no indexed image matches it (did you mean '2023/Holidays'? "
        "GET /api/facets lists them all)"
    )
    page.fill("#folder", "")
    page.fill("#taken-from", "2023-07-12")
    page.fill("#taken-to", "2023-07-11")
    page.click("#search-form button[type=submit]")
    expect(page.locator("#status")).to_contain_text("Error: the \u201cfrom\u201d date is after the \u201cto\u201d date")
    page.fill("#taken-from", "1990-01-01")
    page.fill("#taken-to", "1990-12-31")
    page.click("#search-form button[type=submit]")
    expect(page.locator("#status")).to_have_text("No results. No image matches the filters: widen or clear them.")
    page.close()


def test_the_order_toggle_sorts_by_capture_time(browser: Browser, library_server: LiveServer) -> None:
    from playwright.sync_api import expect

    page = _open_library(browser, library_server)
    _search(page, "a photo", k=50)
    dates = page.locator(".result .taken")
    expect(dates).to_have_count(19)
    assert dates.all_inner_texts() != sorted(dates.all_inner_texts())  # best match first: not by date
    with page.expect_request(lambda request: "sort=newest" in request.url):
        page.check('input[name="sort"][value="newest"]')
    expect(dates.first).to_have_text("2023-07-15")
    newest = dates.all_inner_texts()
    assert newest == sorted(newest, reverse=True) and len(newest) == 19
    with page.expect_request(lambda request: "sort=oldest" in request.url):
        page.check('input[name="sort"][value="oldest"]')
    expect(dates.first).to_have_text("2010-01-01")
    assert dates.all_inner_texts() == sorted(newest)
    assert page.locator(".result .path").first.inner_text() == "scans/scan_0.png"
    page.close()


def test_scrolling_loads_the_next_page_and_stops_at_the_last(browser: Browser, library_server: LiveServer) -> None:
    from playwright.sync_api import expect

    page = _open_library(browser, library_server, width=520, height=480)  # two columns: a page of 4 fills the view
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url) if "/api/search?" in request.url else None)
    _search(page, "a photo", k=4)
    results = page.locator(".result")
    page.wait_for_timeout(500)
    assert results.count() == 4 and len(requests) == 1  # the end of the list is out of sight: no second page yet
    for shown in (8, 12, 16, 19):
        page.locator("#more").scroll_into_view_if_needed()
        expect(results).to_have_count(shown)
    expect(page.locator("#more")).to_have_text("No more results.")
    page.mouse.wheel(0, 5000)
    page.wait_for_timeout(500)
    assert len(requests) == 5 and all("cursor=" in url for url in requests[1:])
    ids = [results.nth(i).get_attribute("data-id") for i in range(results.count())]
    assert len(set(ids)) == 19
    expect(page.locator("#status")).to_contain_text("19 results for your text")
    page.close()


def test_a_stale_cursor_runs_the_search_again_with_a_notice(browser: Browser, library_server: LiveServer) -> None:
    from playwright.sync_api import Route, expect

    page = _open_library(browser, library_server, expected=(r"status of 409",), width=520, height=480)
    stale: list[str] = []

    def republished(route: Route) -> None:
        if "cursor=" in route.request.url and not stale:
            stale.append(route.request.url)
            detail = "the index changed since this cursor was made: search again without the cursor"
            route.fulfill(status=409, json={"detail": detail})
        else:
            route.continue_()

    page.route("**/api/search?*", republished)
    _search(page, "a photo", k=4)
    with page.expect_request(lambda request: "/api/search?" in request.url and "cursor=" not in request.url):
        page.locator("#more").scroll_into_view_if_needed()
    expect(page.locator("#notice")).to_have_text(
        "The index was updated while you scrolled: the list was fetched again."
    )
    expect(page.locator(".result")).to_have_count(4)
    assert len(stale) == 1
    page.close()


def test_the_duplicates_view_shows_the_planted_copy_in_pages(
    browser: Browser, library_server: LiveServer, library: PhotoLibrary
) -> None:
    from playwright.sync_api import expect

    page = _open_library(browser, library_server)
    page.fill("#threshold", "1")
    page.click("#duplicates-form button[type=submit]")
    expect(page.locator("#results-heading")).to_have_text("Duplicates at similarity \u2265 1")
    groups = page.locator(".group")
    expect(groups).to_have_count(1)
    expect(groups.first.locator(".group-head")).to_have_text("2 identical files")
    assert sorted(groups.first.locator(".path").all_inner_texts()) == sorted(library.copy)
    assert groups.first.locator('.member[data-kind="exact"]').count() == 2
    page.wait_for_function(ALL_THUMBNAILS_LOADED)
    expect(page.locator("#status")).to_contain_text("1 of 1 group of duplicates among 19 images")
    original_link = groups.first.locator("a.card").first.get_attribute("href") or ""
    assert re.fullmatch(r"/api/images/\d+/file", original_link)

    # at the default, the tiny random model also groups each shoot's photos: 4 groups, in pages of 2
    with page.expect_request(lambda request: "page_size=2" in request.url and "cursor" not in request.url):
        page.fill("#k", "2")
        page.fill("#threshold", "0.995")
        page.click("#duplicates-form button[type=submit]")
    expect(page.locator("#status")).to_contain_text("of 4 groups of duplicates among 19 images")
    page.locator("#more").scroll_into_view_if_needed()
    expect(groups).to_have_count(4)
    expect(page.locator("#more")).to_have_text("No more results.")
    assert set(library.copy) <= set(groups.first.locator(".path").all_inner_texts())

    page.fill("#duplicates-folder", "2019")
    page.click("#duplicates-form button[type=submit]")
    expect(page.locator("#results-heading")).to_have_text("Duplicates at similarity \u2265 0.995 in 2019")
    expect(groups).to_have_count(1)
    assert all(path.startswith("2019/") for path in groups.locator(".path").all_inner_texts())
    page.close()


def test_the_far_ends_of_the_date_range_are_open_ends(
    browser: Browser, library_server: LiveServer, library: PhotoLibrary
) -> None:
    from playwright.sync_api import expect

    page = _open_library(browser, library_server)
    page.fill("#taken-from", "0001-01-01")
    page.fill("#taken-to", "9999-12-31")  # its next day is in year 10000, which the server refuses: no bound is sent
    with page.expect_request(lambda request: "/api/search?" in request.url) as sent:
        _search(page, "a photo", k=50)
    assert "taken_after=0001-01-01" in sent.value.url and "taken_before" not in sent.value.url
    expect(page.locator(".result")).to_have_count(len(library.photos))
    with page.expect_request(lambda request: "taken_before=9999-12-31" in request.url):
        page.fill("#taken-to", "9999-12-30")
        page.dispatch_event("#taken-to", "change")
    expect(page.locator("#status")).to_contain_text(f"{len(library.photos)} results")
    page.close()


@pytest.mark.parametrize(
    ("box", "sent"), [("#taken-from", "taken_after=10000-01-01"), ("#taken-to", "taken_before=10000-01-02")]
)
def test_a_date_the_server_refuses_shows_its_detail(
    browser: Browser, library_server: LiveServer, box: str, sent: str
) -> None:
    """A date input takes years past 9999; the server refuses them and the page says what it said."""
    from playwright.sync_api import expect

    page = _open_library(browser, library_server, expected=(r"status of 422",))
    page.set_checked("#relevant", False)
    page.fill("#query", "a photo")
    page.fill(box, "10000-01-01")
    with page.expect_request(lambda request: sent in request.url):
        page.click("#search-form button[type=submit]")
    expect(page.locator("#status")).to_contain_text(
        f"Error: {sent.split('=')[0]}: Value error, must be an ISO 8601 date or datetime"
    )
    expect(page.locator("#status")).to_contain_text("of a year from 0001 to 9999")
    page.close()


years_library = test_facet_pages.library  # (index, folders) of 260 event folders of ten years: a fixture here too


@pytest.fixture(scope="module")
def years_server(
    years_library: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The server over 260 event folders of ten years, more than one answer of the page's folder suggestions."""
    server = start_server(years_library[0], tmp_path_factory.mktemp("years-live"))
    yield server
    stop_server(server)


def _open_years(browser: Browser, server: LiveServer) -> Page:
    """A page over the ten years, once the first folders are offered."""
    from playwright.sync_api import expect

    page = _open(browser, server.url)
    expect(page.locator("#status")).to_contain_text("250 images indexed")
    expect(page.locator("#folder-list option")).to_have_count(FOLDER_LIMIT)
    return page


def test_folder_suggestions_follow_what_is_typed(
    browser: Browser, years_server: LiveServer, years_library: tuple[Path, list[str]], tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    folders = years_library[1]
    page = _open_years(browser, years_server)
    hint = page.locator("#folder-hint")
    assert page.eval_on_selector("#folder-list", FOLDER_OPTIONS) == folders[:FOLDER_LIMIT]
    expect(hint).to_have_text(f"and {len(folders) - FOLDER_LIMIT} more: type more")

    # typing asks for the folders starting with what is typed: those beyond the first answer too
    may = [f for f in folders if f.startswith("2023/2023-05")]
    assert len(may) == 5 and not set(may) & set(folders[:FOLDER_LIMIT])
    with page.expect_request(lambda request: "folder_prefix=2023%2F2023-05&" in request.url) as sent:
        page.locator("#folder").press_sequentially("2023/2023-05")
    assert f"limit={FOLDER_LIMIT}" in sent.value.url
    expect(page.locator("#folder-list option")).to_have_count(5)
    assert page.eval_on_selector("#folder-list", FOLDER_OPTIONS) == may
    expect(hint).to_be_hidden()

    # a prefix more than one answer matches says how many more there are
    page.fill("#folder", "")
    page.locator("#folder").press_sequentially("201")
    early = [f for f in folders if f.startswith("201")]
    expect(hint).to_have_text(f"and {len(early) - FOLDER_LIMIT} more: type more")
    assert page.eval_on_selector("#folder-list", FOLDER_OPTIONS) == early[:FOLDER_LIMIT]
    _screenshot(page, tmp_path / "folders.png")
    page.locator("#folder").press_sequentially("9/2019-03 X")
    expect(hint).to_have_text("No folder starts with \u201c2019/2019-03 X\u201d.")
    expect(page.locator("#folder-list option")).to_have_count(0)

    # a folder past the first answer filters the search; clearing the filters offers the first folders again
    page.fill("#folder", "2023/2023-05 Lisbon")
    _search(page, "a photo", k=10)
    assert _paths(page) == ["2023/2023-05 Lisbon/IMG_0001.png"]
    page.click("#clear-filters")
    expect(page.locator("#folder-list option")).to_have_count(FOLDER_LIMIT)
    expect(hint).to_have_text(f"and {len(folders) - FOLDER_LIMIT} more: type more")

    # the duplicates' folder box has its own suggestions
    page.locator("#duplicates-folder").press_sequentially("2014/")
    expect(page.locator("#duplicates-folder-list option")).to_have_count(25)
    expect(page.locator("#duplicates-folder-hint")).to_be_hidden()
    expect(page.locator("#folder-list option")).to_have_count(FOLDER_LIMIT)
    page.close()


def test_folder_suggestions_wait_for_a_pause_and_drop_stale_answers(
    browser: Browser, years_server: LiveServer, years_library: tuple[Path, list[str]]
) -> None:
    from playwright.sync_api import expect

    folders = years_library[1]
    page = _open_years(browser, years_server)
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url) if "folder_prefix=" in request.url else None)

    # twelve keystrokes with no pause between them: one request, for all of it
    page.eval_on_selector(
        "#folder",
        """(input, text) => {
            for (let end = 1; end <= text.length; end += 1) {
                input.value = text.slice(0, end);
                input.dispatchEvent(new Event("input", { bubbles: true }));
            }
        }""",
        "2016/2016-02",
    )
    expect(page.locator("#folder-list option")).to_have_count(5)
    page.wait_for_timeout(300)
    assert len(asked) == 1 and "folder_prefix=2016%2F2016-02&" in asked[0]

    # the answer for "2015" comes after the one for "2015/2015-04": the later question's answer stays
    page.evaluate(
        """() => {
            const send = window.fetch;
            const late = (answer) => new Promise((resolve) => setTimeout(() => {
                window.staleAnswered = true;
                resolve(answer);
            }, 1500));
            window.fetch = (url, options) =>
                String(url).includes("folder_prefix=2015&") ? send(url, options).then(late) : send(url, options);
        }"""
    )
    page.fill("#folder", "")
    with page.expect_request(lambda request: "folder_prefix=2015&" in request.url):
        page.locator("#folder").press_sequentially("2015")
    page.locator("#folder").press_sequentially("/2015-04")
    april = [f for f in folders if f.startswith("2015/2015-04")]
    expect(page.locator("#folder-list option")).to_have_count(len(april))
    assert not page.evaluate("window.staleAnswered")  # the answers came in the other order
    page.wait_for_function("window.staleAnswered")
    page.wait_for_timeout(300)  # time to show the 26 folders of "2015", were stale answers shown
    assert page.eval_on_selector("#folder-list", FOLDER_OPTIONS) == april
    page.close()


def test_page_has_no_console_or_page_errors(page: Page) -> None:
    """Runs last: every page above (and this one) logged no console error and threw no uncaught exception."""
    _search(page, "a green square", k=4)
    page.locator(".result").first.click()
    page.wait_for_function(ALL_THUMBNAILS_LOADED)
    assert _errors == []
