"""Photo metadata through the indexer: read from EXIF as files are encoded, filled in for an index built before it
was read (without re-encoding), GPS kept only with --store-gps, and filters over it on the published index."""

from __future__ import annotations

import calendar
import dataclasses
import io
import sqlite3
from pathlib import Path

import pytest
from PIL import Image, TiffImagePlugin

from indexer.build import BuildOptions
from indexer.encode import build_on_engine
from indexer.partition_encoder import LocalEngine
from indexer.store import Catalog, PublishedIndex
from indexer.store.filters import SearchFilter
from tests.indexer.test_build import IN_PROCESS, build

pytestmark = pytest.mark.slow  # two builds each: left out of make check (tests/indexer/test_photo_metadata.py stays)
JUNE_1 = calendar.timegm((2024, 6, 1, 14, 3, 59, 0, 0, 0))


def camera_jpeg(path: Path, colour: tuple[int, int, int], date: str, model: str, latitude: float) -> Path:
    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Canon", model
    exif.get_ifd(0x8769)[0x9003] = date
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", tuple(TiffImagePlugin.IFDRational(v) for v in (latitude, 0, 0))
    gps[3], gps[4] = "E", tuple(TiffImagePlugin.IFDRational(v) for v in (13, 24, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (96, 64), colour).save(path, "JPEG", exif=exif)
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    camera_jpeg(root / "2024/a.jpg", (200, 30, 30), "2024:06:01 14:03:59", "Canon EOS R5", 52)
    camera_jpeg(root / "2019/b.jpg", (30, 200, 30), "2019:01:02 03:04:05", "Canon EOS 5D", 48)
    data = io.BytesIO()
    Image.new("RGB", (64, 96), (30, 30, 200)).save(data, "PNG")
    (root / "scans").mkdir(parents=True)
    (root / "scans" / "c.png").write_bytes(data.getvalue())
    return root


def stored(index_dir: Path) -> dict[str, tuple[object, ...]]:
    with Catalog.open(index_dir, readonly=True) as catalog:
        files = catalog.files()
        found = catalog.photos.of([r.content_hash for r in files.values() if r.content_hash])
        return {
            path: (m.taken_at, m.camera_model, m.gps_lat, m.format)
            for path, r in files.items()
            if (m := found.get(r.content_hash or "")) is not None
        }


def test_the_build_reads_each_photos_metadata_and_gps_only_when_asked(
    photos: Path, tmp_path: Path, tiny_model: Path
) -> None:
    index_dir = tmp_path / "index"
    build(photos, index_dir, tiny_model)
    assert stored(index_dir) == {
        "2024/a.jpg": (JUNE_1, "Canon EOS R5", None, "jpeg"),
        "2019/b.jpg": (calendar.timegm((2019, 1, 2, 3, 4, 5, 0, 0, 0)), "Canon EOS 5D", None, "jpeg"),
        "scans/c.png": (None, None, None, "png"),
    }
    stats = build(photos, index_dir, tiny_model, store_gps=True)
    assert stats.encoded == 0 and stats.metadata_read == 3  # type: ignore[attr-defined]  # read again, not encoded
    assert stored(index_dir)["2024/a.jpg"][2] == pytest.approx(52.0)
    again = build(photos, index_dir, tiny_model, store_gps=True)
    assert again.metadata_read == 0  # type: ignore[attr-defined]
    build(photos, index_dir, tiny_model)
    assert all(values[2] is None for values in stored(index_dir).values())  # dropped once the setting is off


def test_an_index_built_before_metadata_gets_it_at_its_next_build_without_re_encoding(
    photos: Path, tmp_path: Path, tiny_model: Path
) -> None:
    index_dir = tmp_path / "index"
    build(photos, index_dir, tiny_model)
    with sqlite3.connect(index_dir / "catalog.sqlite3") as conn:
        conn.execute("DROP TABLE photo_metadata")  # as a catalog written before the table existed
    with PublishedIndex.open(index_dir) as before:
        generation = before.manifest.generation
        columns = before.photo_columns()
        assert not columns.taken_from_exif.any()  # mtime only
    stats = build(photos, index_dir, tiny_model)
    assert stats.encoded == 0 and stats.metadata_read == 3  # type: ignore[attr-defined]
    with PublishedIndex.open(index_dir) as after:
        assert after.manifest.generation != generation  # published, so servers load the metadata
        query = after.embedding(1)
        assert query is not None
        june = SearchFilter(taken_from=JUNE_1 - 86_400, taken_until=JUNE_1 + 86_400)
        assert [after.images([h.id])[h.id].path for h in after.search(query[None], 10, june)[0]] == ["2024/a.jpg"]
        canon = after.search(query[None], 10, SearchFilter(cameras=("eos",)))[0]
        assert sorted(after.images([h.id])[h.id].path for h in canon) == ["2019/b.jpg", "2024/a.jpg"]
        assert len(after.search(query[None], 10, SearchFilter(orientation="portrait"))[0]) == 1


def test_a_build_on_an_engine_fills_in_and_drops_metadata_as_the_local_build_does(
    photos: Path, tmp_path: Path, tiny_model: Path
) -> None:
    index_dir = tmp_path / "index"
    options = BuildOptions(root=photos, index_dir=index_dir, model=str(tiny_model), plan=IN_PROCESS, store_gps=True)
    build_on_engine(options, LocalEngine(IN_PROCESS), partition_size=2)
    assert stored(index_dir)["2024/a.jpg"][2] == pytest.approx(52.0)  # the shards carried it
    with sqlite3.connect(index_dir / "catalog.sqlite3") as conn:
        conn.execute("DELETE FROM photo_metadata")  # rows indexed before metadata was read
    with PublishedIndex.open(index_dir) as before:
        generation = before.manifest.generation

    stats = build_on_engine(dataclasses.replace(options, store_gps=False), LocalEngine(IN_PROCESS), partition_size=2)

    assert (stats.encode.encoded, stats.metadata_read) == (0, 3)  # read from the files' headers, nothing encoded
    assert stored(index_dir)["2024/a.jpg"] == (JUNE_1, "Canon EOS R5", None, "jpeg")  # and no GPS without the setting
    with PublishedIndex.open(index_dir) as after:
        assert after.manifest.generation != generation  # published, so servers load the metadata
