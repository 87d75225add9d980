"""Folder scan: extension allowlist, hidden names, exclude globs, order, symlink policy, unreadable directories,
stored-form paths and the entries passed over with a reason."""

from __future__ import annotations

import importlib.util
import os
import socket
import stat
from pathlib import Path

import pytest
from PIL import features

from indexer import paths, scan
from indexer.scan import (
    DEFAULT_EXTENSIONS,
    HEIF_EXTENSIONS,
    PassedOver,
    ScannedFile,
    iter_images,
    supported_extensions,
)

JPG = frozenset({"jpg"})


def touch(root: Path, *relatives: str) -> None:
    for relative in relatives:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def scanned_paths(root: Path, **options: object) -> list[str]:
    return [f.path for f in iter_images(root, **options)]  # type: ignore[arg-type]  # options mirror the signature


def test_matches_extensions_case_insensitively(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg", "IMG.JPG", "b.PnG", "c.Jpeg", "d.txt", "e", "f.jpg.bak", "g.tiff", "h.webp", "jpg")
    assert scanned_paths(tmp_path, extensions=DEFAULT_EXTENSIONS) == [
        "IMG.JPG", "a.jpg", "b.PnG", "c.Jpeg", "g.tiff", "h.webp",
    ]  # fmt: skip


def test_extensions_argument_is_normalized(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg", "b.png")
    assert scanned_paths(tmp_path, extensions=frozenset({".JPG"})) == ["a.jpg"]


def test_default_extensions_follow_what_pillow_can_decode(tmp_path: Path) -> None:
    extensions = supported_extensions()
    assert ("avif" in extensions) == features.check("avif")
    assert (HEIF_EXTENSIONS <= extensions) == (importlib.util.find_spec("pillow_heif") is not None)
    assert DEFAULT_EXTENSIONS - {"avif"} <= extensions
    touch(tmp_path, "a.jpg", "b.bmp", "c.txt")
    assert scanned_paths(tmp_path) == ["a.jpg", "b.bmp"]


def test_skips_hidden_files_and_directories(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg", ".hidden.jpg", ".cache/b.jpg", "sub/.c.jpg", "sub/d.jpg")
    assert scanned_paths(tmp_path, extensions=JPG) == ["a.jpg", "sub/d.jpg"]
    assert scanned_paths(tmp_path, extensions=JPG, skip_hidden=False) == [
        ".cache/b.jpg", ".hidden.jpg", "a.jpg", "sub/.c.jpg", "sub/d.jpg",
    ]  # fmt: skip


def test_walks_nested_directories_in_a_deterministic_sorted_order(tmp_path: Path) -> None:
    relatives = ["z.jpg", "b/y.jpg", "b/a/x.jpg", "a.jpg", "b.jpg", "b/a.jpg", "c/d/e/f/g.jpg", "B/upper.jpg"]
    touch(tmp_path, *relatives)
    first = scanned_paths(tmp_path, extensions=JPG)
    assert first == sorted(relatives, key=lambda p: p.split("/"))
    assert first == ["B/upper.jpg", "a.jpg", "b/a/x.jpg", "b/a.jpg", "b/y.jpg", "b.jpg", "c/d/e/f/g.jpg", "z.jpg"]
    assert scanned_paths(tmp_path, extensions=JPG) == first


def test_records_size_and_mtime_from_stat(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.jpg"
    path.parent.mkdir()
    path.write_bytes(b"12345")
    os.utime(path, ns=(1_000_000_000, 1_234_567_891_234_567_891))
    assert list(iter_images(tmp_path, JPG)) == [ScannedFile("sub/a.jpg", 5, 1_234_567_891_234_567_891)]


EXCLUDE_TREE = (
    "a.jpg",
    "a.tmp.jpg",
    "@eaDir/top.jpg",
    "photos/@eaDir/x/thumb.jpg",
    "photos/keep.jpg",
    "photos/2020/keep.jpg",
    "thumbs/small.jpg",
    "thumbs/deeper/small.jpg",
    "other/thumbs/kept.jpg",
    "raw/img1.jpg",
    "raw/img2.jpg",
    "cache/c.jpg",
    "x/cache.jpg",
)


@pytest.mark.parametrize(
    ("patterns", "excluded"),
    [
        (["**/@eaDir/**"], {"@eaDir/top.jpg", "photos/@eaDir/x/thumb.jpg"}),
        (["@eaDir"], {"@eaDir/top.jpg", "photos/@eaDir/x/thumb.jpg"}),  # no "/": a name at any depth
        (["*.tmp.jpg"], {"a.tmp.jpg"}),
        (["*keep*"], {"photos/keep.jpg", "photos/2020/keep.jpg"}),
        (["thumbs/*"], {"thumbs/small.jpg", "thumbs/deeper/small.jpg"}),  # anchored at the root
        (["/thumbs/**"], {"thumbs/small.jpg", "thumbs/deeper/small.jpg"}),
        (["**/thumbs"], {"thumbs/small.jpg", "thumbs/deeper/small.jpg", "other/thumbs/kept.jpg"}),
        (["photos/*.jpg"], {"photos/keep.jpg"}),  # "*" does not cross "/"
        (["photos/**/*.jpg"], {"photos/keep.jpg", "photos/2020/keep.jpg", "photos/@eaDir/x/thumb.jpg"}),
        (["raw/img[12].jpg"], {"raw/img1.jpg", "raw/img2.jpg"}),
        (["raw/img[!1].jpg"], {"raw/img2.jpg"}),
        (["raw/img?.jpg"], {"raw/img1.jpg", "raw/img2.jpg"}),
        (["cache/"], {"cache/c.jpg"}),  # trailing "/": directories only, so x/cache.jpg stays
        (["cache*"], {"cache/c.jpg", "x/cache.jpg"}),
        (["Thumbs/*"], set()),  # case-sensitive
        (["*.tmp.jpg", "raw"], {"a.tmp.jpg", "raw/img1.jpg", "raw/img2.jpg"}),
    ],
)
def test_exclude_patterns(tmp_path: Path, patterns: list[str], excluded: set[str]) -> None:
    touch(tmp_path, *EXCLUDE_TREE)
    assert set(scanned_paths(tmp_path, extensions=JPG, exclude=patterns)) == set(EXCLUDE_TREE) - excluded


def test_excluded_directories_are_not_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "keep/a.jpg", "skip/deep/b.jpg")
    listed: list[str] = []
    real_scandir = os.scandir

    def recording_scandir(path: str) -> object:
        listed.append(Path(path).name)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", recording_scandir)
    assert scanned_paths(tmp_path, extensions=JPG, exclude=["skip/**"]) == ["keep/a.jpg"]
    assert "skip" not in listed and "deep" not in listed


def test_empty_exclude_pattern_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty exclude pattern"):
        scanned_paths(tmp_path, exclude=["/"])


def test_symlink_policy(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    touch(root, "real.jpg", "dir/inner.jpg")
    touch(outside, "secret.jpg", "odir/x.jpg")
    (root / "link_inside.jpg").symlink_to(root / "dir" / "inner.jpg")
    (root / "link_outside.jpg").symlink_to(outside / "secret.jpg")
    (root / "broken.jpg").symlink_to(root / "missing.jpg")
    (root / "dirlink").symlink_to(root / "dir", target_is_directory=True)
    (root / "odirlink").symlink_to(outside / "odir", target_is_directory=True)
    (root / "dir" / "loop").symlink_to(root, target_is_directory=True)
    found = {f.path: f for f in iter_images(root, JPG)}
    assert sorted(found) == ["dir/inner.jpg", "link_inside.jpg", "real.jpg"]
    assert found["link_inside.jpg"].size == (root / "dir" / "inner.jpg").stat().st_size


def test_root_given_through_a_symlink_is_scanned(tmp_path: Path) -> None:
    touch(tmp_path / "real", "a.jpg")
    (tmp_path / "real" / "b.jpg").symlink_to(tmp_path / "real" / "a.jpg")
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    assert scanned_paths(tmp_path / "alias", extensions=JPG) == ["a.jpg", "b.jpg"]


def test_unreadable_directory_is_reported_and_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "a.jpg", "locked/b.jpg", "open/c.jpg")
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    errors: list[tuple[str, OSError]] = []
    assert scanned_paths(tmp_path, extensions=JPG, on_error=lambda p, e: errors.append((p, e))) == [
        "a.jpg", "open/c.jpg",
    ]  # fmt: skip
    assert [(p, type(e)) for p, e in errors] == [("locked", PermissionError)]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores directory permissions")
def test_chmod_000_directory_is_skipped(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg", "locked/b.jpg")
    (tmp_path / "locked").chmod(0)
    try:
        errors: list[str] = []
        assert scanned_paths(tmp_path, extensions=JPG, on_error=lambda p, e: errors.append(p)) == ["a.jpg"]
        assert errors == ["locked"]
    finally:
        (tmp_path / "locked").chmod(0o755)


def test_missing_root_raises_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="image folder does not exist"):
        list(iter_images(tmp_path / "nope"))
    touch(tmp_path, "file.jpg")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        list(iter_images(tmp_path / "file.jpg"))


def test_is_a_lazy_generator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "a/1.jpg", "b/2.jpg")
    calls: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path: str) -> object:
        calls.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    images = iter_images(tmp_path, JPG)
    assert next(images).path == "a/1.jpg"
    assert len(calls) == 2  # root and a/, not yet b/
    assert [f.path for f in images] == ["b/2.jpg"]


def test_enable_heif_reports_whether_pillow_heif_is_installed() -> None:
    assert scan.enable_heif() == (importlib.util.find_spec("pillow_heif") is not None)


def scan_with_skips(root: Path, **options: object) -> tuple[list[str], dict[str, PassedOver]]:
    """(yielded stored paths, passed-over entries by stored path), checking that on_skip sees each entry once."""
    passed: list[PassedOver] = []
    found = [f.path for f in iter_images(root, on_skip=passed.append, **options)]  # type: ignore[arg-type]  # options mirror the signature
    assert len({p.path for p in passed}) == len(passed)
    return found, {p.path: p for p in passed}


def test_entries_that_look_like_images_but_are_not_files_are_passed_over_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    touch(root, "real.jpg", "dir/inner.jpg", "album.jpg/inside.png")
    touch(outside, "secret.jpg")
    os.mkfifo(root / "pipe.jpg")
    (root / "broken.jpg").symlink_to(root / "missing.jpg")
    (root / "self.jpg").symlink_to(root / "self.jpg")
    (root / "ping.png").symlink_to(root / "pong.png")
    (root / "pong.png").symlink_to(root / "ping.png")
    (root / "outside.jpg").symlink_to(outside / "secret.jpg")
    (root / "dirlink.jpg").symlink_to(root / "dir", target_is_directory=True)
    (root / "pipelink.jpg").symlink_to(root / "pipe.jpg")
    with socket.socket(socket.AF_UNIX) as server:
        monkeypatch.chdir(root)
        server.bind("sock.png")  # relative: a socket's path may hold only ~100 bytes
        found, passed = scan_with_skips(root, extensions=frozenset({"jpg", "png"}))
    assert found == ["album.jpg/inside.png", "dir/inner.jpg", "real.jpg"]  # a directory x.jpg is still descended
    reasons = {path: entry.reason for path, entry in passed.items()}
    assert reasons == {
        "album.jpg": "not a regular file: a directory",
        "broken.jpg": f"dangling symlink: its target {root / 'missing.jpg'} does not exist",
        "dirlink.jpg": "not a regular file: a symlink to a directory",
        "outside.jpg": f"symlink outside the folder: it points to {outside / 'secret.jpg'}",
        "ping.png": "symlink loop: following it never reaches a file",
        "pipe.jpg": "not a regular file: a FIFO",
        "pipelink.jpg": "not a regular file: a symlink to a FIFO",
        "pong.png": "symlink loop: following it never reaches a file",
        "self.jpg": "symlink loop: following it never reaches a file",
        "sock.png": "not a regular file: a socket",
    }
    assert all(reason.split(":")[0] in scan.PASSED_OVER_CATEGORIES for reason in reasons.values())
    link = (root / "outside.jpg").lstat()
    assert (passed["outside.jpg"].size, passed["outside.jpg"].mtime_ns) == (link.st_size, link.st_mtime_ns)


def test_a_device_is_passed_over(tmp_path: Path) -> None:
    try:
        os.mknod(tmp_path / "null.jpg", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device needs CAP_MKNOD")
    found, passed = scan_with_skips(tmp_path, extensions=JPG)
    assert found == [] and passed["null.jpg"].reason == "not a regular file: a character device"


def test_only_candidate_images_are_passed_over(tmp_path: Path) -> None:
    touch(tmp_path, "keep.jpg")
    os.mkfifo(tmp_path / "pipe.txt")  # not an image extension
    (tmp_path / ".hidden.jpg").symlink_to(tmp_path / "missing.jpg")  # hidden
    (tmp_path / "excluded.jpg").symlink_to(tmp_path / "missing.jpg")  # excluded
    (tmp_path / "photos").mkdir()  # a directory without an image extension
    (tmp_path / "skipdir.jpg").mkdir()  # an excluded directory
    found, passed = scan_with_skips(tmp_path, extensions=JPG, exclude=["excluded.jpg", "skipdir.jpg/"])
    assert found == ["keep.jpg"] and passed == {}


def test_a_file_that_vanishes_after_the_listing_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    touch(tmp_path, "a.jpg", "gone.jpg")
    listed = scan._sorted_entries

    def listing_then_delete(path: str) -> list[os.DirEntry[str]]:
        entries = listed(path)
        (tmp_path / "gone.jpg").unlink(missing_ok=True)
        return entries

    monkeypatch.setattr(scan, "_sorted_entries", listing_then_delete)
    found, passed = scan_with_skips(tmp_path, extensions=JPG)
    assert found == ["a.jpg"]
    assert passed["gone.jpg"] == PassedOver("gone.jpg", 0, 0, "missing: it disappeared while the folder was scanned")


def test_an_error_examining_one_entry_passes_it_over_and_the_scan_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    touch(tmp_path, "a.jpg", "bad.jpg", "c.jpg")
    examine = scan._examine

    def failing_examine(entry: os.DirEntry[str], stored: str, real_root: str) -> object:
        if stored == "bad.jpg":
            raise RuntimeError("boom")
        return examine(entry, stored, real_root)

    monkeypatch.setattr(scan, "_examine", failing_examine)
    found, passed = scan_with_skips(tmp_path, extensions=JPG)
    assert found == ["a.jpg", "c.jpg"]
    assert passed["bad.jpg"].reason == "unreadable: RuntimeError: boom"
    assert "bad.jpg" in caplog.text


def test_odd_names_are_yielded_in_the_stored_form(tmp_path: Path) -> None:
    names = [b"a\\b.png", b"caf\xe9.png", b"line\nbreak.png", b"sub\xff/x.png"]
    for name in names:
        path = os.path.join(os.fsencode(tmp_path), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(b"x")
    found = [f.path for f in iter_images(tmp_path, frozenset({"png"}))]
    assert sorted(found) == sorted(["a\\\\b.png", "caf\\xe9.png", "line\nbreak.png", "sub\\xff/x.png"])
    assert sorted(os.fsencode(paths.file_path(Path("."), p)) for p in found) == sorted(names)


def test_an_unreadable_directory_is_reported_in_the_stored_form(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    touch(tmp_path, "a.jpg")
    locked = os.path.join(os.fsencode(tmp_path), b"locked\xff")
    os.mkdir(locked)
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if os.fsencode(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    errors: list[str] = []
    assert scanned_paths(tmp_path, extensions=JPG, on_error=lambda p, e: errors.append(p)) == ["a.jpg"]
    assert errors == ["locked\\xff"]
