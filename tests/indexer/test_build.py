"""The indexer end to end: real image files in, a published index out, through the library and the CLI."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import clip_model
from clip_model.process_tuning import ThreadPlan
from clip_model.process_tuning.threads import default_thread_count, own_faiss_thread_count
from indexer import cli
from indexer.build import (
    BuildOptions,
    LoadedModel,
    build_index,
    load_model,
)
from indexer.cli import main as cli_main
from indexer.errors import IndexerError, IndexLockedError, ModelMismatchError
from indexer.scan import extension_of, supported_extensions
from indexer.store import Catalog, PublishedIndex, WriterLock, verify
from tests.clip_model.images import write_all_samples, write_oriented, write_truncated_jpeg
from tests.indexer.conftest import write_photo, write_photos

IN_PROCESS = ThreadPlan.for_indexing(workers=0)  # decoding in the test's own process


def build(root: Path, index_dir: Path, model: Path, **kwargs: object) -> object:
    return build_index(BuildOptions(root=root, index_dir=index_dir, model=str(model), plan=IN_PROCESS, **kwargs))  # type: ignore[arg-type]


def write_bad_files(root: Path) -> dict[str, str]:
    """Files that must be skipped, with the reason category each must get."""
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad" / "empty.jpg").write_bytes(b"")
    (root / "bad" / "text.png").write_text("this is not an image\n")
    (root / "bad" / "noise.webp").write_bytes(np.random.default_rng(0).bytes(4096))
    shutil.move(write_truncated_jpeg(root / "bad"), root / "bad" / "truncated.jpg")
    bomb = Image.new("L", (1, 1))
    bomb.save(root / "bad" / "bomb.png")
    data = bytearray((root / "bad" / "bomb.png").read_bytes())
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width and height: 10^10 pixels claimed
    import zlib

    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    (root / "bad" / "bomb.png").write_bytes(bytes(data))
    return {"bad/empty.jpg": "empty file", "bad/text.png": "not an image", "bad/noise.webp": "not an image",
            "bad/truncated.jpg": "truncated", "bad/bomb.png": "decompression bomb"}  # fmt: skip


def test_every_kind_of_file_is_indexed_or_skipped_with_a_reason(tiny_model: Path, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    (root / "kinds").mkdir(parents=True)
    (root / "exif").mkdir()
    samples = write_all_samples(root / "kinds")
    for orientation in range(1, 9):
        write_oriented(root / "exif", orientation, "jpg")
    expected_skips = write_bad_files(root)
    (root / ".hidden.jpg").write_bytes((root / "kinds" / next(iter(os.listdir(root / "kinds")))).read_bytes())
    (root / "notes.txt").write_text("not indexed: not an image extension")

    stats = build(root, index_dir, tiny_model)

    with Catalog.open(index_dir, readonly=True) as catalog:
        files = catalog.files()
        skipped = dict(catalog.skipped())
    good = {p for p, rec in files.items() if rec.status == "ok"}
    indexable = {
        f"kinds/{s.path.name}" for s in samples.values() if extension_of(s.path.name) in supported_extensions()
    }
    assert "kinds/gray16.pgm" not in indexable | set(files)  # PGM is not on the extension allowlist
    assert len(indexable) >= 15 and indexable <= good
    assert len([p for p in good if p.startswith("exif/")]) == 8
    assert ".hidden.jpg" not in files and "notes.txt" not in files
    for path, category in expected_skips.items():
        assert skipped[path].startswith(category), (path, skipped[path])
    assert stats.skipped == len(expected_skips) and stats.encoded == len(good)
    assert verify(index_dir) == []


def test_stored_embedding_equals_the_library_encoding_of_the_file(tiny_model: Path, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    paths = write_photos(root, 5)
    build(root, index_dir, tiny_model, draft=False)
    model, preprocess = clip_model.load(tiny_model)
    index = PublishedIndex.open(index_dir)
    with Catalog.open(index_dir, readonly=True) as catalog:
        ids = {p: rec.id for p, rec in catalog.files().items()}
    for path in paths:
        with torch.no_grad():
            expected = model.encode_image(preprocess(Image.open(path))[None], normalize=True)[0].numpy()
        stored = index.embedding(ids[path.name])
        assert stored is not None and np.allclose(stored, expected, atol=1e-5)


def test_fp32_builds_encode_with_packed_layers_and_int8_builds_with_int8_ones(tiny_model: Path) -> None:
    assert clip_model.is_packed(load_model(str(tiny_model)).model)
    assert clip_model.is_quantized(load_model(str(tiny_model), precision="int8").model)


def test_int8_builds_store_the_int8_encoding_and_share_the_index_with_fp32_runs(
    tiny_model: Path, tmp_path: Path
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    paths = write_photos(root, 4)
    build(root, index_dir, tiny_model, draft=False, precision="int8")
    model, preprocess = clip_model.load(tiny_model)
    int8 = clip_model.quantize_int8(model)
    with Catalog.open(index_dir, readonly=True) as catalog:
        assert catalog.model().weights_sha256 == clip_model.weights_sha256(model)  # type: ignore[union-attr]
        ids = {p: rec.id for p, rec in catalog.files().items()}
    index = PublishedIndex.open(index_dir)
    for path in paths:
        with torch.no_grad():
            pixels = preprocess(Image.open(path))[None]
            expected = int8.encode_image(pixels, normalize=True)[0].numpy()
            fp32 = model.encode_image(pixels, normalize=True)[0].numpy()
        stored = index.embedding(ids[path.name])
        assert stored is not None and np.allclose(stored, expected, atol=1e-5)
        assert not np.allclose(stored, fp32, atol=1e-5)
    index.close()
    write_photos(root, 1, start=10)
    stats: Any = build(root, index_dir, tiny_model, draft=False)  # an fp32 run updates the int8-built index
    assert stats.encoded == 1 and stats.unchanged == 4
    with pytest.raises(IndexerError, match="precision"):
        build(root, index_dir, tiny_model, precision="int4")


@pytest.mark.parametrize(
    ("precision", "threads", "streams", "expected"),
    [
        ("int8", 0, 0, {("encode", 1)}),  # 2 cores: two streams of one thread
        ("fp32", 0, 0, {("encode", 1)}),
        ("fp32", 2, 1, {("build", 2)}),  # one stream: the build's own thread, with every thread
        ("int8", 1, 0, {("build", 1)}),
        ("fp32", 4, 2, {("encode", 2)}),
    ],
)
def test_the_build_encodes_in_its_streams_on_their_thread_counts_and_gives_the_callers_back(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, threads: int, streams: int,
    expected: set[tuple[str, int]],
) -> None:  # fmt: skip
    seen: list[tuple[str, int]] = []
    encode = LoadedModel.encode
    build_thread = threading.current_thread()

    def counting_encode(self: LoadedModel, batch: np.ndarray) -> np.ndarray:
        on_build_thread = threading.current_thread() is build_thread
        seen.append(("build" if on_build_thread else threading.current_thread().name[:6], torch.get_num_threads()))
        return encode(self, batch)

    monkeypatch.setattr(LoadedModel, "encode", counting_encode)
    write_photos(tmp_path / "photos", 9)
    default, own, own_faiss = default_thread_count(), torch.get_num_threads(), own_faiss_thread_count()
    plan = ThreadPlan.for_indexing(precision, threads=threads, streams=streams, workers=1, cores=2)
    options = BuildOptions(tmp_path / "photos", tmp_path / "index", str(tiny_model), precision=precision, plan=plan,
                           batch_size=2)  # fmt: skip
    assert build_index(options).encoded == 9
    assert set(seen) == expected
    assert torch.get_num_threads() == own and default_thread_count() == default
    assert own_faiss_thread_count() == own_faiss


@pytest.mark.parametrize("flag", ["--threads", "--streams", "--workers"])
def test_a_negative_thread_count_is_refused_before_anything_is_written(
    tiny_model: Path, tmp_path: Path, flag: str, caplog: pytest.LogCaptureFixture
) -> None:
    write_photos(tmp_path / "photos", 1)
    argv = ["build", str(tmp_path / "photos"), "--index-dir", str(tmp_path / "index"), "--model", str(tiny_model)]
    assert cli_main([*argv, flag, "-1"]) == 1
    assert f"{flag[2:]} must be 0 or more, got -1" in caplog.text
    assert not (tmp_path / "index").exists()


def test_search_returns_exact_nearest_neighbours(tiny_model: Path, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 60)
    build(root, index_dir, tiny_model)
    with Catalog.open(index_dir, readonly=True) as catalog:
        ids, vectors = catalog.embeddings()
    queries = np.random.default_rng(0).standard_normal((5, vectors.shape[1])).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = PublishedIndex.open(index_dir)
    for query, hits in zip(queries, index.search(queries, k=10), strict=True):
        scores = vectors @ query
        best = np.argsort(-scores)[:10]
        assert [h.id for h in hits] == [int(ids[i]) for i in best]
        assert np.allclose([h.score for h in hits], scores[best], atol=1e-5)


def test_incremental_add_modify_delete_rename_and_noop(tiny_model: Path, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 10)
    first = build(root, index_dir, tiny_model)
    assert (first.added, first.encoded) == (10, 10)

    noop = build(root, index_dir, tiny_model)
    assert (noop.unchanged, noop.encoded, noop.added, noop.deleted) == (10, 0, 0, 0)
    assert noop.generation == first.generation  # nothing changed: nothing republished

    with Catalog.open(index_dir, readonly=True) as catalog:
        before = catalog.files()
    write_photos(root, 2, start=100)  # add 2
    write_photo(root / "photo_00001.jpg", seed=999)  # modify content
    (root / "photo_00002.jpg").unlink()  # delete
    (root / "moved").mkdir()
    (root / "photo_00003.jpg").rename(root / "moved" / "renamed.jpg")  # rename
    stamp = root / "photo_00004.jpg"
    os.utime(stamp, ns=(stamp.stat().st_atime_ns, stamp.stat().st_mtime_ns + 10**9))  # touched, same bytes

    second = build(root, index_dir, tiny_model)
    assert (second.added, second.modified, second.deleted, second.renamed, second.touched) == (2, 1, 1, 1, 1)
    assert second.encoded == 3  # two new files and one modified; the rename and the touch reuse their vectors
    with Catalog.open(index_dir, readonly=True) as catalog:
        after = catalog.files()
    assert after["moved/renamed.jpg"].id == before["photo_00003.jpg"].id
    assert "photo_00002.jpg" not in after and "photo_00003.jpg" not in after
    index = PublishedIndex.open(index_dir)
    assert index.manifest.counts["images"] == 11
    assert verify(index_dir) == []


def test_skipped_file_is_retried_only_when_it_changes(tiny_model: Path, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 2)
    (root / "later.jpg").write_bytes(b"")
    assert build(root, index_dir, tiny_model).skipped == 1
    assert build(root, index_dir, tiny_model).skipped == 0  # unchanged: not read again
    write_photo(root / "later.jpg", seed=5)
    fixed = build(root, index_dir, tiny_model)
    assert (fixed.modified, fixed.skipped) == (1, 0)


def test_other_model_is_refused_with_a_way_out(tiny_model: Path, other_tiny_model: Path, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 3)
    build(root, index_dir, tiny_model)
    with pytest.raises(ModelMismatchError, match=r"built with model .*tiny\.safetensors.*--rebuild"):
        build(root, index_dir, other_tiny_model)
    rebuilt = build(root, index_dir, other_tiny_model, rebuild=True)
    assert rebuilt.encoded == 3
    assert PublishedIndex.open(index_dir).manifest.model_name == str(other_tiny_model)


def test_second_writer_is_refused_while_the_first_holds_the_lock(tiny_model: Path, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 2)
    index_dir.mkdir()
    with WriterLock(index_dir), pytest.raises(IndexLockedError, match=str(os.getpid())):
        build(root, index_dir, tiny_model)


def test_cli_build_info_verify_texts(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 4)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    args = ["--index-dir", str(index_dir)]
    assert cli_main(["build", str(root), *args, "--model", str(tiny_model), "--workers", "1"]) == 0
    assert cli_main(["info", *args, "--json"]) == 0
    info = __import__("json").loads(capsys.readouterr().out)
    assert (info["images_indexed"], info["images_skipped"]) == (4, 1)
    assert info["skipped_files"][0][0] == "broken.jpg"
    assert (info["last_run"]["stats"]["device"], info["last_run"]["stats"]["precision"]) == ("cpu", "fp32")
    assert cli_main(["info", *args]) == 0
    assert "4 encoded (" in (shown := capsys.readouterr().out) and " images/s, on cpu in fp32)" in shown
    assert cli_main(["verify", *args]) == 0
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red square\n\na blue circle\na red square\n")
    assert cli_main(["texts", str(corpus), *args]) == 0
    index = PublishedIndex.open(index_dir)
    assert index.manifest.counts["texts"] == 2
    model, _ = clip_model.load(tiny_model)
    with torch.no_grad():
        query = model.encode_text(clip_model.tokenize(["a blue circle"]), normalize=True).numpy()
    hit = index.search_texts(query, k=1)[0][0]
    assert index.texts([hit.id])[hit.id] == "a blue circle" and hit.score == pytest.approx(1.0, abs=1e-5)


def test_cli_reports_failures_with_exit_code_1(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = cli_main(["build", str(tmp_path / "missing"), "--index-dir", str(tmp_path / "i"), "--model", "x.pt"])
    assert code == 1 and "does not exist" in caplog.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--device", "cuda"], r"device 'cuda' \(--device / CLIPSEARCH_DEVICE\) asks for CUDA, but this torch"),
        (["--device", "cuda:1"], "asks for CUDA"),
        (["--device", "gpu"], r"device 'gpu' \(--device / CLIPSEARCH_DEVICE\) is not one of auto, cpu, cuda"),
        (["--precision", "fp16"], r"'fp16' \(--precision / CLIPSEARCH_PRECISION\) runs on CUDA only, and device"),
    ],
)
def test_a_device_this_machine_cannot_encode_on_is_refused_before_the_index_is_touched(
    options: list[str],
    message: str,
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, whatever runs the test
    root, index_dir, fresh = tmp_path / "photos", tmp_path / "index", tmp_path / "fresh"
    write_photos(root, 2)
    build(root, index_dir, tiny_model)
    before = {path: path.stat().st_mtime_ns for path in index_dir.rglob("*")}
    for target in (index_dir, fresh):
        argv = ["build", str(root), "--index-dir", str(target), "--model", str(tiny_model), "--workers", "0"]
        caplog.clear()
        assert cli_main([*argv, *options]) == 1
        assert re.search(message, caplog.text), caplog.text
    assert {path: path.stat().st_mtime_ns for path in index_dir.rglob("*")} == before and not fresh.exists()


def test_the_device_setting_comes_from_the_environment(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "cuda")
    root = tmp_path / "photos"
    write_photos(root, 1)
    argv = ["build", str(root), "--index-dir", str(tmp_path / "index"), "--model", str(tiny_model), "--workers", "0"]
    assert cli_main(argv) == 1 and "device 'cuda'" in caplog.text
    assert cli_main([*argv, "--device", "cpu"]) == 0  # the flag wins


def test_a_thread_count_that_is_not_a_number_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CLIPSEARCH_TORCH_THREADS", "two")
    with pytest.raises(SystemExit) as stopped:
        cli_main(["build", str(tmp_path), "--index-dir", str(tmp_path / "index")])
    assert stopped.value.code == 2 and "--threads: invalid int value: 'two'" in capsys.readouterr().err


def test_an_error_recording_one_file_skips_it_with_a_reason_and_the_build_goes_on(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 3)
    add_image = Catalog.add_image

    def failing_add_image(self: Catalog, path: str, *args: Any) -> int:
        if path == "photo_00001.jpg":
            raise ValueError("this row is refused")
        return add_image(self, path, *args)

    monkeypatch.setattr(Catalog, "add_image", failing_add_image)
    stats: Any = build(root, index_dir, tiny_model)
    assert (stats.added, stats.skipped, stats.skipped_reasons) == (2, 1, {"unrecordable": 1})
    with Catalog.open(index_dir, readonly=True) as catalog:
        assert catalog.skipped() == [("photo_00001.jpg", "unrecordable: ValueError: this row is refused")]
    assert "photo_00001.jpg" in caplog.text and PublishedIndex.open(index_dir).manifest.counts["images"] == 2

    def broken_catalog(self: Catalog, path: str, *args: Any) -> int:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Catalog, "add_image", broken_catalog)
    write_photos(root, 1, start=10)
    with pytest.raises(sqlite3.OperationalError):  # the catalog's failure is no file's: the run stops
        build(root, index_dir, tiny_model)


def test_an_indexed_file_replaced_by_a_link_outside_the_folder_leaves_the_index(
    tiny_model: Path, tmp_path: Path
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 3)
    write_photo(tmp_path / "outside" / "secret.jpg", seed=50)
    build(root, index_dir, tiny_model)
    (root / "photo_00000.jpg").unlink()
    (root / "photo_00000.jpg").symlink_to(tmp_path / "outside" / "secret.jpg")
    stats: Any = build(root, index_dir, tiny_model)
    assert (stats.skipped, stats.skipped_reasons, stats.encoded) == (1, {"symlink outside the folder": 1}, 0)
    assert PublishedIndex.open(index_dir).manifest.counts["images"] == 2
    with Catalog.open(index_dir, readonly=True) as catalog:
        assert catalog.files()["photo_00000.jpg"].status == "skipped"
    assert verify(index_dir) == []


def test_a_dangling_link_is_indexed_once_its_target_appears(tiny_model: Path, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 1)
    (root / "later.jpg").symlink_to(root / "target.jpg")
    assert build(root, index_dir, tiny_model).skipped == 1
    assert build(root, index_dir, tiny_model).skipped == 0  # unchanged: not recorded again
    write_photo(root / "target.jpg", seed=7)  # the link itself is untouched: its lstat is the same
    stats: Any = build(root, index_dir, tiny_model)
    assert (stats.modified, stats.added, stats.skipped) == (1, 1, 0)  # later.jpg now indexed, target.jpg new
    with Catalog.open(index_dir, readonly=True) as catalog:
        assert catalog.skipped() == [] and catalog.files()["later.jpg"].status == "ok"


def test_info_says_how_many_skipped_files_it_leaves_out_and_all_lists_them(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 1)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (root / name).write_bytes(b"")
    build(root, index_dir, tiny_model)
    monkeypatch.setattr(cli, "SKIPPED_SHOWN", 2)
    capsys.readouterr()
    assert cli_main(["info", "--index-dir", str(index_dir)]) == 0
    shown = capsys.readouterr().out
    assert "  a.jpg: empty file" in shown and "  c.jpg" not in shown
    assert "  ... and 1 more: `clip-index info --all` lists them" in shown
    assert cli_main(["info", "--index-dir", str(index_dir), "--all"]) == 0
    shown = capsys.readouterr().out
    assert all(f"  {name}: empty file" in shown for name in ("a.jpg", "b.jpg", "c.jpg")) and "more" not in shown


def test_rows_under_a_folder_that_cannot_be_listed_are_kept(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    locked = Path(os.fsdecode(os.path.join(os.fsencode(root), b"locked\xe9")))
    write_photos(root, 1)
    write_photos(locked, 2)
    assert build(root, index_dir, tiny_model).added == 3
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    stats: Any = build(root, index_dir, tiny_model)
    assert (stats.deleted, stats.scanned) == (0, 1)  # out of reach, not gone
    with Catalog.open(index_dir, readonly=True) as catalog:
        assert sorted(catalog.files()) == [
            "locked\\xe9/photo_00000.jpg",
            "locked\\xe9/photo_00001.jpg",
            "photo_00000.jpg",
        ]


def test_a_rerun_publishes_what_a_run_killed_before_its_publish_had_committed(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_photos(root, 3)
    build(root, index_dir, tiny_model)
    write_photos(root, 2, start=3)

    def killed(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the run's rows are committed; its publish never happens

    with monkeypatch.context() as patch:
        patch.setattr("indexer.build.publish", killed)
        with pytest.raises(KeyboardInterrupt):
            build(root, index_dir, tiny_model)
    stats: Any = build(root, index_dir, tiny_model)  # finds nothing new in the folder...
    assert stats.encoded == 0 and stats.unchanged == 5
    with PublishedIndex.open(index_dir) as index:  # ...and still publishes what the killed run committed
        assert index.manifest.counts["images"] == 5 and index.manifest.generation == stats.generation
    assert verify(index_dir) == []
