"""Files with names any POSIX system allows are served: the JSON shows the stored path (backslash and bytes that are
not UTF-8 escaped, see indexer.paths), and the original and its thumbnail come from the file with the exact name."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from indexer.cli import main as clip_index
from tests.app.conftest import write_image

NAMES = {  # file name on disk (bytes) -> the path the API shows
    b"back\\slash.png": "back\\\\slash.png",
    b"caf\xe9 latin-1.png": "caf\\xe9 latin-1.png",
    b"new\nline.png": "new\nline.png",
    unicodedata.normalize("NFC", "café.png").encode(): unicodedata.normalize("NFC", "café.png"),
    unicodedata.normalize("NFD", "café.png").encode(): unicodedata.normalize("NFD", "café.png"),
    b"\xff\xfe dir/" + b"x" * 251 + b".png": "\\xff\\xfe dir/" + "x" * 251 + ".png",
}


def test_odd_file_names_are_searched_and_served_by_their_exact_name(tmp_path: Path, app_model: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    files = {}
    for i, (name, shown) in enumerate(NAMES.items()):
        path = Path(os.fsdecode(os.fsencode(root) + b"/" + name))
        files[shown] = write_image(path, (40 * i, 100, 200), seed=i, size=(30 + i, 20)).read_bytes()
    command = ["build", str(root), "--index-dir", str(index_dir), "--model", str(app_model), "--workers", "0"]
    assert clip_index(command) == 0
    settings = Settings(index_dir=index_dir, cache_dir=tmp_path / "cache")
    with TestClient(create_app(settings, watch=False)) as client:
        hits = client.get("/api/search", params={"q": "a photo", "k": 100}).json()["results"]
        assert sorted(hit["path"] for hit in hits) == sorted(NAMES.values())
        for hit in hits:
            assert client.get(hit["url"]).content == files[hit["path"]]
            thumbnail = client.get(hit["thumbnail_url"])
            assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
            assert client.get(f"/api/images/{hit['id']}").json()["path"] == hit["path"]
