"""What a hostile or careless client sends gets a 4xx JSON answer, never a 500 and never unbounded work: non-finite
numbers and lone surrogates in JSON, prompt templates with format fields, non-ASCII API keys, integers spelled as
floats or booleans, indexed files replaced by something that no longer decodes."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from indexer.cli import main as clip_index
from tests.app.conftest import IndexedFolder, write_image
from tests.app.test_images_and_errors import image_id, png_bomb
from tests.clip_model.images import write_truncated_jpeg

JSON = {"content-type": "application/json"}
BAD_TEMPLATES = (
    "{} {x}",
    "{!r} {}",
    "{.__class__} {}",
    "{0} {}",
    "{{}}{:>200000000}",
    "{:}",
    "{} {}",
    "no field",
    "}{}",
)


@pytest.fixture(scope="module")
def hostile(indexed: IndexedFolder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app over the shared index (lifespan running); server exceptions propagate, so a 500 fails the test."""
    with TestClient(create_app(indexed.settings(tmp_path_factory.mktemp("hostile")), watch=False)) as client:
        yield client


@pytest.fixture(scope="module")
def red(hostile: TestClient) -> int:
    return image_id(hostile, "red/red_0.jpg")


def post_raw(client: TestClient, path: str, text: str) -> Any:
    """POST ``text`` verbatim as a JSON body; the answer must be a JSON 422, returned as its ``detail``."""
    response = client.post(path, content=text.encode("utf-8"), headers=JSON)
    assert response.status_code == 422, (path, text, response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    return response.json()["detail"]


# --- JSON bodies ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_non_finite_numbers_are_refused_with_their_place(hostile: TestClient, red: int, number: str) -> None:
    cases = {
        "/api/search/combined": (f'{{"parts": [{{"text": "a", "weight": {number}}}]}}', ["parts", 0, "weight"]),
        "/api/classify": (f'{{"image_id": {red}, "labels": ["a"], "extra": [1, {number}]}}', ["extra", 1]),
        "/api/describe": (f'{{"image_id": {red}, "k": {number}}}', ["k"]),
        "/api/embed/text": (f'{{"texts": ["a"], "min_score": {{"x": {number}}}}}', ["min_score", "x"]),
    }
    for path, (body, place) in cases.items():
        detail = post_raw(hostile, path, body)
        assert detail == [{"type": "finite_number", "loc": ["body", *place], "msg": detail[0]["msg"]}], (
            detail
        )  # only the one problem, and no echo of the input
        assert "must be finite" in detail[0]["msg"]


@pytest.mark.parametrize(
    ("path", "body", "place"),
    [
        ("/api/embed/text", '{"texts": ["\\ud800"]}', ["texts", 0]),
        ("/api/embed/text", '{"texts": ["ok", "a\\udfffb"]}', ["texts", 1]),
        ("/api/search/combined", '{"parts": [{"text": "\\udc80", "weight": 1}]}', ["parts", 0, "text"]),
        ("/api/classify", '{"image_id": 0, "labels": ["cat", "\\ud83d"]}', ["labels", 1]),
        ("/api/classify", '{"image_id": 0, "labels": ["cat"], "templates": ["a {} \\udbff"]}', ["templates", 0]),
        ("/api/describe", '{"image_id": 0, "candidates": ["\\ud800\\ud800"]}', ["candidates", 0]),
        ("/api/search/combined", '{"parts": [{"text": "a"}], "\\ud800": 1}', []),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(
    hostile: TestClient, path: str, body: str, place: list[Any]
) -> None:
    detail = post_raw(hostile, path, body)
    assert [(d["type"], d["loc"]) for d in detail] == [("string_unicode", ["body", *place])]


def test_a_surrogate_pair_is_one_valid_character(hostile: TestClient) -> None:
    response = hostile.post("/api/embed/text", content=b'{"texts": ["cat \\ud83d\\ude00"]}', headers=JSON)
    assert response.status_code == 200 and len(response.json()["embeddings"]) == 1


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b'{"texts": ["\xff"]}', "not UTF-8"),
        (b'{"texts": ["\xed\xa0\x80"]}', "not UTF-8"),  # a surrogate encoded as UTF-8 bytes
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),  # UTF-16, which Python's json would have guessed
        (b'{"texts": [1' + b"0" * 5000 + b"]}", "cannot be read"),
        (b"[" * 100_000, "nested too deeply"),
        (b'{"texts": ["a"', "JSON decode error"),
    ],
)
def test_unreadable_json_is_a_422_not_a_400_or_500(hostile: TestClient, body: bytes, fragment: str) -> None:
    response = hostile.post("/api/embed/text", content=body, headers=JSON)
    assert response.status_code == 422 and fragment in response.text, response.text


def test_every_json_route_reads_bodies_strictly(hostile: TestClient) -> None:
    spec = hostile.get("/openapi.json").json()
    json_operations = [
        (method, path)
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if "application/json" in operation.get("requestBody", {}).get("content", {})
    ]
    assert len(json_operations) == 4
    for method, path in json_operations:
        response = hostile.request(method, path, content=b'{"probe": NaN}', headers=JSON)
        assert response.status_code == 422 and response.json()["detail"][0]["type"] == "finite_number", path


def test_the_validation_handler_encodes_what_it_cannot_echo(hostile: TestClient) -> None:
    """A multipart body in a charset that makes lone surrogates (unicode_escape) reaches pydantic, which refuses the
    label; the 422 must still be valid JSON, without the input, with the problem's place."""
    png = write_image_bytes()
    body = (
        b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + png + b"\r\n"
        b'--B\r\nContent-Disposition: form-data; name="labels"\r\n\r\ncat\\ud800\r\n'
        b'--B\r\nContent-Disposition: form-data; name="\\udfff"\r\n\r\nx\r\n--B--\r\n'
    )
    headers = {"content-type": "multipart/form-data; boundary=B; charset=unicode_escape"}
    response = hostile.post("/api/classify/upload", content=body, headers=headers)
    assert response.status_code == 422
    detail = json.loads(response.content.decode("utf-8"))["detail"]
    assert [(d["type"], d["loc"]) for d in detail] == [("string_unicode", ["body", "labels", 0])]
    assert all("input" not in d for d in detail)


def write_image_bytes() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(out, "PNG")
    return out.getvalue()


# --- zero-shot templates ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", BAD_TEMPLATES)
def test_templates_with_format_fields_are_refused_naming_the_template(
    hostile: TestClient, red: int, template: str
) -> None:
    body = {"image_id": red, "labels": ["cat", "dog"], "templates": ["a photo of a {}.", template]}
    response = hostile.post("/api/classify", json=body)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["loc"] == ["body", "templates", 1] and repr(template)[:10] in problem["msg"]

    data = {"labels": ["cat", "dog"], "templates": ["a photo of a {}.", template]}
    upload = hostile.post("/api/classify/upload", files={"file": ("a.png", write_image_bytes())}, data=data)
    assert upload.status_code == 422, upload.text
    (problem,) = upload.json()["detail"]
    assert problem["loc"] == ["body", "templates", 1] and repr(template)[:10] in problem["msg"]


def test_templates_with_escaped_braces_classify(hostile: TestClient, red: int) -> None:
    body = {"image_id": red, "labels": ["cat", "dog"], "templates": ["{{{}}}", "a photo of a {}.", "}}{}{{"]}
    response = hostile.post("/api/classify", json=body)
    assert response.status_code == 200 and response.json()["templates"] == 3


def test_labels_and_templates_at_their_limits_are_accepted(hostile: TestClient, red: int) -> None:
    """A schema-valid request: the longest label through the longest template (the prompt is longer than either)."""
    body = {"image_id": red, "labels": ["x" * 1000, "y"], "templates": ["{}" + "z" * 998]}
    response = hostile.post("/api/classify", json=body)
    assert response.status_code == 200, response.text


def test_the_schema_states_the_template_and_label_rules(hostile: TestClient) -> None:
    schemas = hostile.get("/openapi.json").json()["components"]["schemas"]
    for name in ("ClassifyRequest", "Body_classify_upload_api_classify_upload_post"):
        properties = schemas[name]["properties"]
        templates = properties["templates"]
        item = (templates["anyOf"][0] if "anyOf" in templates else templates)["items"]
        assert item["pattern"].startswith("^") and item["maxLength"] == 1000
        assert properties["labels"]["uniqueItems"] is True


# --- strict integers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["true", "1.0", '"1"', "1e0", "null"])
def test_integers_in_json_bodies_are_json_integers(hostile: TestClient, red: int, value: str) -> None:
    for path, body, field in [
        ("/api/classify", f'{{"image_id": {value}, "labels": ["a"]}}', "image_id"),
        ("/api/describe", f'{{"image_id": {red}, "k": {value}}}', "k"),
        ("/api/search/combined", f'{{"parts": [{{"image_id": {value}}}]}}', "image_id"),
        ("/api/search/combined", f'{{"parts": [{{"text": "a"}}], "k": {value}}}', "k"),
    ]:
        detail = post_raw(hostile, path, body)
        assert any(d["loc"][-1] == field for d in detail), (path, body, detail)


@pytest.mark.parametrize("value", ["true", '"0.5"', "false"])
def test_numbers_in_json_bodies_are_json_numbers(hostile: TestClient, value: str) -> None:
    post_raw(hostile, "/api/search/combined", f'{{"parts": [{{"text": "a", "weight": {value}}}]}}')
    post_raw(hostile, "/api/search/combined", f'{{"parts": [{{"text": "a"}}], "min_score": {value}}}')


@pytest.mark.parametrize("spelling", ["{}.0", "{}e0", "+{}", "%20{}", "{}%20", "0x{}", "true", "{}_0", "%D9%A7"])
def test_path_and_query_integers_are_plain_decimal_digits(hostile: TestClient, red: int, spelling: str) -> None:
    text = spelling.format(red)
    for url in (
        f"/api/images/{text}",
        f"/api/images/{red}/similar?k={text}",
        f"/api/images/{red}/thumbnail?size={text}",
        f"/api/search?q=cat&k={text}",
    ):
        response = hostile.get(url)
        assert response.status_code == 422 and "plain decimal integer" in response.text, (url, response.text)
    assert hostile.get(f"/api/images/{red}").status_code == 200
    assert hostile.get(f"/api/images/{red}/similar?k=3").status_code == 200


def test_non_finite_query_numbers_are_refused(hostile: TestClient) -> None:
    for value in ("nan", "inf", "-Infinity"):
        assert hostile.get("/api/search", params={"q": "cat", "min_score": value}).status_code == 422


# --- API keys ---------------------------------------------------------------------------------------------------


def test_api_keys_compare_as_bytes_whatever_the_client_sends(indexed: IndexedFolder, tmp_path: Path) -> None:
    settings = indexed.settings(tmp_path, api_key="clé-ключ", admin_api_key="admin-ключ")
    with TestClient(create_app(settings, watch=False)) as client:

        def status(key: bytes) -> int:
            return client.get("/api/search", params={"q": "x"}, headers={"X-API-Key": key}).status_code

        assert status("clé-ключ".encode()) == 200
        assert status("admin-ключ".encode()) == 200
        for wrong in ("clé-ключ".encode("utf-16"), "ключ".encode(), b"\xff\xfe", b"cl\xe9-", "clé".encode("latin-1")):
            assert status(wrong) == 401, wrong
        assert client.get("/api/search", params={"q": "x", "api_key": "clé-ключ"}).status_code == 200
        assert client.get("/api/search?q=x&api_key=%FF%C3").status_code == 401  # not UTF-8 once unquoted
        admin = client.get("/api/admin/reindex", headers={"X-API-Key": "admin-ключ".encode()})
        assert admin.status_code == 200
        assert client.get("/api/admin/reindex", headers={"X-API-Key": b"\xc3"}).status_code == 401


def test_an_ascii_key_refuses_non_ascii_headers_with_401(indexed: IndexedFolder, tmp_path: Path) -> None:
    settings = indexed.settings(tmp_path, api_key="reader", admin_api_key="admin")
    with TestClient(create_app(settings, watch=False)) as client:
        response = client.get("/api/stats", headers={"X-API-Key": "rеader".encode()})  # a Cyrillic "е"
        assert response.status_code == 401 and response.json()["detail"].startswith("this server needs an API key")
        assert client.post("/api/admin/reindex", headers={"X-API-Key": b"\x80\x81"}).status_code == 401


# --- indexed files that no longer decode ------------------------------------------------------------------------


@pytest.fixture
def replaced(indexed: IndexedFolder, tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    """A freshly indexed folder of four images, served; the test replaces files afterwards."""
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    for i, name in enumerate(("a.png", "b.jpg", "c.png", "d.png")):
        write_image(root / name, (40 * i, 90, 200 - 40 * i), seed=i)
    command = ["build", str(root), "--index-dir", str(index_dir), "--model", str(indexed.model), "--workers", "0"]
    assert clip_index(command) == 0
    settings = indexed.settings(tmp_path, index_dir=index_dir, max_image_pixels=20_000)
    with TestClient(create_app(settings, watch=False)) as client:
        yield client, root


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_thumbnails_of_files_that_no_longer_decode_are_409_saying_to_reindex(
    replaced: tuple[TestClient, Path], tmp_path: Path
) -> None:
    client, root = replaced
    ids = {name: image_id(client, name) for name in ("a.png", "b.jpg", "c.png", "d.png")}
    (root / "a.png").write_bytes(png_bomb())  # 10^10 pixels claimed: Pillow's own bomb error
    shutil.copy(write_truncated_jpeg(tmp_path), root / "b.jpg")
    (root / "c.png").write_bytes(b"not an image at all")
    write_image(root / "d.png", (1, 2, 3), seed=9, size=(200, 150))  # 30,000 pixels: over this server's 20,000
    for name, image in ids.items():
        response = client.get(f"/api/images/{image}/thumbnail", params={"size": 64})
        assert response.status_code == 409, (name, response.text)
        assert "run the indexer" in response.json()["detail"], response.text
        assert client.get(f"/api/images/{image}/file").status_code == 200  # the bytes are still served as they are
    (root / "c.png").unlink()
    assert client.get(f"/api/images/{ids['c.png']}/thumbnail").status_code == 404


def test_a_file_the_server_may_not_read_is_409_not_500(
    replaced: tuple[TestClient, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OS's answer to "may I read it" is simulated: root (as in CI containers) may read any file."""
    client, root = replaced
    image, target, access = image_id(client, "a.png"), (root / "a.png").resolve(), os.access
    monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and Path(path) != target)
    response = client.get(f"/api/images/{image}/file")
    assert response.status_code == 409 and "permission denied" in response.json()["detail"], response.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_an_unreadable_indexed_file_is_409_not_500(replaced: tuple[TestClient, Path]) -> None:
    client, root = replaced
    image = image_id(client, "a.png")
    (root / "a.png").chmod(0)
    try:
        for suffix in ("file", "thumbnail"):
            response = client.get(f"/api/images/{image}/{suffix}")
            assert response.status_code == 409 and "a.png" in response.json()["detail"], response.text
    finally:
        (root / "a.png").chmod(0o644)


def test_the_image_routes_document_every_status_they_answer(hostile: TestClient) -> None:
    paths = hostile.get("/openapi.json").json()["paths"]
    for route in ("/api/images/{image_id}/file", "/api/images/{image_id}/thumbnail"):
        assert {"401", "404", "409", "422", "503"} <= set(paths[route]["get"]["responses"])
    upload = paths["/api/search/image"]["post"]
    assert {"400", "413", "415", "422"} <= set(upload["responses"])


# --- uploads and methods ----------------------------------------------------------------------------------------


def test_an_empty_upload_is_refused_and_the_schema_says_so(hostile: TestClient) -> None:
    schemas = hostile.get("/openapi.json").json()["components"]["schemas"]
    assert schemas["Body_search_image_api_search_image_post"]["properties"]["file"]["minLength"] == 1
    for path in ("/api/search/image", "/api/embed/image", "/api/describe/upload"):
        response = hostile.post(path, files={"file": ("e.png", b"")})
        assert response.status_code == 422 and "empty" in response.json()["detail"]


def test_malformed_multipart_is_a_json_400(hostile: TestClient) -> None:
    for content_type, body in [
        ("multipart/form-data", b"--B\r\n--B--\r\n"),  # no boundary
        ("multipart/form-data; boundary=B", b"--B\r\n--B--\r\n"),  # a part without headers
        ("multipart/form-data; boundary=B", b"garbage"),
    ]:
        response = hostile.post("/api/search/image", content=body, headers={"content-type": content_type})
        assert response.status_code == 400 and "multipart" in response.json()["detail"], response.text


def test_a_wrong_method_lists_every_method_of_the_path(hostile: TestClient) -> None:
    response = hostile.request("OPTIONS", "/api/admin/reindex")
    assert response.status_code == 405 and response.headers["allow"] == "GET, POST"
    assert response.json() == {"detail": "Method Not Allowed"}
    assert hostile.delete("/api/search").headers["allow"] == "GET"


def test_range_refusals_are_json_and_ranges_still_work(hostile: TestClient, indexed: IndexedFolder, red: int) -> None:
    data = indexed.files["red/red_0.jpg"].read_bytes()
    part = hostile.get(f"/api/images/{red}/file", headers={"Range": "bytes=0-9"})
    assert part.status_code == 206 and part.content == data[:10]
    for header, status in [("bytes=abc", 400), ("bytes=9-1", 400), ("pages=1-2", 400), ("bytes=99999999-", 416)]:
        for url in (f"/api/images/{red}/file", f"/api/images/{red}/thumbnail"):
            response = hostile.get(url, headers={"Range": header})
            assert response.status_code == status and response.headers["content-type"] == "application/json", url
            assert response.json()["detail"].startswith("Range header refused"), response.text
    beyond = hostile.get(f"/api/images/{red}/file", headers={"Range": f"bytes={len(data)}-"})
    assert beyond.headers["content-range"] == f"bytes */{len(data)}"


def test_a_bug_is_a_500_with_a_json_body(
    indexed: IndexedFolder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    with TestClient(create_app(indexed.settings(tmp_path), watch=False), raise_server_exceptions=False) as client:
        monkeypatch.setattr(client.app.state.service, "stats", broken)  # type: ignore[attr-defined]
        response = client.get("/api/stats")
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    assert "a bug in the server" in response.json()["detail"]
