"""Images served by id (files, thumbnails, conditional requests, paths that escape the folder) and every kind of
bad input answered with a 4xx JSON message, never a 500."""

from __future__ import annotations

import io
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.imaging import allowed_formats
from app.main import create_app
from indexer.cli import main as clip_index
from tests.app.conftest import IndexedFolder, write_image
from tests.clip_model.images import write_truncated_jpeg


def image_id(client: TestClient, path: str) -> int:
    for hit in client.get("/api/search", params={"q": "anything", "k": 1000}).json()["results"]:
        if hit["path"] == path:
            return int(hit["id"])
    raise AssertionError(f"{path} is not indexed")


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid 1x1 PNG whose header claims ``width`` x ``height`` pixels."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, "PNG")
    data = bytearray(out.getvalue())
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    return bytes(data)


def test_image_metadata_file_and_thumbnail(client: TestClient, indexed: IndexedFolder) -> None:
    image = image_id(client, "red/red_2.webp")
    info = client.get(f"/api/images/{image}").json()
    assert info["path"] == "red/red_2.webp" and info["bytes"] == indexed.files["red/red_2.webp"].stat().st_size
    response = client.get(info["url"])
    assert response.status_code == 200 and response.content == indexed.files["red/red_2.webp"].read_bytes()
    assert response.headers["etag"] and "max-age" in response.headers["cache-control"]
    assert client.get(info["url"], headers={"If-None-Match": response.headers["etag"]}).status_code == 304
    thumb = client.get(info["thumbnail_url"], params={"size": 64})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as decoded:
        assert decoded.format == "JPEG" and max(decoded.size) == 64 and decoded.size == (64, 43)
    again = client.get(info["thumbnail_url"], params={"size": 64}, headers={"If-None-Match": thumb.headers["etag"]})
    assert again.status_code == 304


def test_thumbnails_are_generated_once_and_follow_file_changes(indexed: IndexedFolder, tmp_path: Path) -> None:
    with TestClient(create_app(indexed.settings(tmp_path), watch=False)) as client:
        image = image_id(client, "green/green_0.jpg")
        first = client.get(f"/api/images/{image}/thumbnail")
        cached = sorted((tmp_path / "cache" / "thumbnails").rglob("*.jpg"))
        assert len(cached) == 1
        stamp = cached[0].stat().st_mtime_ns
        second = client.get(f"/api/images/{image}/thumbnail")
        assert second.content == first.content and cached[0].stat().st_mtime_ns == stamp
        assert second.headers["etag"] == first.headers["etag"]


def test_files_are_served_by_id_only_and_never_outside_the_folder(indexed: IndexedFolder, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_image(root / "inside.png", (10, 20, 30), seed=1)
    write_image(root / "escape.png", (30, 20, 10), seed=2)
    secret = write_image(tmp_path / "secret.png", (1, 2, 3), seed=3)
    assert (
        clip_index(["build", str(root), "--index-dir", str(index_dir), "--model", str(indexed.model), "--workers", "0"])
        == 0
    )
    os.remove(root / "escape.png")
    os.symlink(secret, root / "escape.png")  # after indexing, the path now leads out of the image folder
    settings = indexed.settings(tmp_path, index_dir=index_dir)
    with TestClient(create_app(settings, watch=False)) as client:
        escape = image_id(client, "escape.png")
        response = client.get(f"/api/images/{escape}/file")
        assert response.status_code == 404 and "outside the image folder" in response.json()["detail"]
        assert client.get(f"/api/images/{escape}/thumbnail").status_code == 404
        assert client.get(f"/api/images/{image_id(client, 'inside.png')}/file").status_code == 200
        os.remove(root / "inside.png")
        gone = client.get(f"/api/images/{image_id(client, 'inside.png')}/file")
        assert gone.status_code == 404 and "no longer in the image folder" in gone.json()["detail"]
        for path in ("/api/images/..%2Fsecret.png/file", "/api/images/-1/file", "/api/images/abc"):
            assert client.get(path).status_code in (404, 422)


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"q": "cat", "k": 0}, "greater than or equal to 1"),
        ({"q": "cat", "k": 1001}, "less than or equal to 1000"),
        ({"q": ""}, "at least 1 character"),
        ({"q": "x" * 1001}, "at most 1000 characters"),
        ({"q": " \t "}, "should match pattern"),
        ({"q": "cat", "min_score": 2}, "less than or equal to 1"),
        ({}, "Field required"),
    ],
)
def test_bad_text_queries_get_a_422_that_says_what_to_change(
    client: TestClient, params: dict[str, object], fragment: str
) -> None:
    response = client.get("/api/search", params=params)
    assert response.status_code == 422
    assert fragment in response.text


def upload(client: TestClient, data: bytes, endpoint: str = "/api/search/image") -> tuple[int, str]:
    response = client.post(endpoint, files={"file": ("upload.jpg", data, "application/octet-stream")})
    return response.status_code, response.json()["detail"] if response.status_code != 200 else ""


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_uploads_get_clear_4xx_errors(client: TestClient, tmp_path: Path, indexed: IndexedFolder) -> None:
    truncated = write_truncated_jpeg(tmp_path).read_bytes()
    psd_like = b"8BPS" + bytes(100)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
    cases = {
        "empty": (b"", 422, "empty"),
        "text": (b"just some text, not an image", 415, "not an image"),
        "noise": (np.random.default_rng(0).bytes(5000), 415, "not an image"),
        "psd": (psd_like, 415, "not an image"),
        "eps (a format Pillow knows but uploads may not use)": (eps, 415, "accepted format"),
        "truncated jpeg": (truncated, 422, "truncated"),
        "bomb": (png_bomb(), 413, "pixels"),
        "just over the pixel limit": (png_bomb(10_000, 9_001), 413, "limit is 90000000"),
    }
    for name, (data, status, fragment) in cases.items():
        for endpoint in ("/api/search/image", "/api/embed/image", "/api/describe/upload"):
            got, detail = upload(client, data, endpoint)
            assert (got, fragment in detail) == (status, True), f"{name} at {endpoint}: {got} {detail}"
    missing = client.post("/api/search/image")
    assert missing.status_code == 422 and "file" in missing.text


def test_upload_formats_and_oddities_are_accepted(client: TestClient, tmp_path: Path) -> None:
    from tests.clip_model.images import write_all_samples

    samples = write_all_samples(tmp_path)
    accepted = 0
    for name, sample in samples.items():
        with Image.open(sample.path) as image:
            allowed = image.format in allowed_formats()
        status, detail = upload(client, sample.path.read_bytes())
        assert status == (200 if allowed else 415), f"{name}: {detail}"
        accepted += allowed
    assert accepted >= 10  # JPEG, PNG, WebP, GIF, TIFF, BMP in every mode the samples cover, EXIF-rotated too


def test_unknown_ids_and_impossible_requests(client: TestClient) -> None:
    assert client.get("/api/images/999999").status_code == 404
    assert client.get("/api/images/999999/similar").json()["detail"] == "no indexed image has id 999999"
    assert client.post("/api/describe", json={"image_id": 999999}).status_code == 404
    assert client.post("/api/classify", json={"image_id": 999999, "labels": ["a"]}).status_code == 404
    image = image_id(client, "red/red_0.jpg")
    cases = [
        ("/api/search/combined", {"parts": [{"text": "sun", "weight": 1}, {"text": "sun", "weight": -1}]}, "cancel"),
        ("/api/search/combined", {"parts": [{"text": "sun", "image_id": image}]}, "Extra inputs are not permitted"),
        ("/api/search/combined", {"parts": []}, "at least 1"),
        ("/api/classify", {"image_id": image, "labels": ["a", "b"], "templates": ["no placeholder"]}, "'{}'"),
        ("/api/classify", {"image_id": image, "labels": ["a", "a"]}, "distinct"),
        ("/api/classify", {"image_id": image, "labels": [f"l{i}" for i in range(101)]}, "at most 100 items"),
        ("/api/classify", {"image_id": image, "labels": []}, "at least 1"),
        ("/api/embed/text", {"texts": [""]}, "at least 1 character"),
        ("/api/describe", {"image_id": image, "candidates": []}, "at least 1"),
    ]
    for path, body, fragment in cases:
        response = client.post(path, json=body)
        assert response.status_code == 422 and fragment in response.text, (path, body, response.text)
    assert (
        client.post(
            "/api/search/combined", content=b"{not json", headers={"content-type": "application/json"}
        ).status_code
        == 422
    )


def test_describe_without_a_corpus_says_how_to_add_one(indexed: IndexedFolder, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_image(root / "one.png", (1, 2, 3), seed=0)
    assert (
        clip_index(["build", str(root), "--index-dir", str(index_dir), "--model", str(indexed.model), "--workers", "0"])
        == 0
    )
    with TestClient(create_app(indexed.settings(tmp_path, index_dir=index_dir), watch=False)) as client:
        response = client.post("/api/describe", json={"image_id": image_id(client, "one.png")})
        assert response.status_code == 422 and "clip-index texts" in response.json()["detail"]


def test_request_body_over_the_limit_is_413(indexed: IndexedFolder, tmp_path: Path) -> None:
    settings = indexed.settings(tmp_path, max_upload_bytes=64 * 1024)
    with TestClient(create_app(settings, watch=False)) as client:
        big = write_image(tmp_path / "big.png", (5, 5, 5), seed=0, size=(400, 400)).read_bytes()
        assert len(big) > 64 * 1024
        response = client.post("/api/search/image", files={"file": ("big.png", big)})
        assert response.status_code == 413 and "limit is 65536 bytes" in response.json()["detail"]

        def chunks() -> object:
            for start in range(0, len(big), 8192):
                yield big[start : start + 8192]

        chunked = client.post("/api/embed/text", content=chunks(), headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        small = shutil.copy(next(iter(indexed.files.values())), tmp_path / "small")
        assert client.post("/api/search/image", files={"file": ("s", Path(small).read_bytes())}).status_code == 200
