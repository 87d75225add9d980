"""Duplicate groups (indexer.duplicates) over real folders indexed by the real indexer, the CLI that prints them,
and the store's read-only methods they use."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import clip_model
from indexer import duplicates
from indexer.cli import main as clip_index
from indexer.duplicates import DEFAULT_THRESHOLD, Duplicates, find_duplicates, near_pairs, roots, union
from indexer.store import PublishedIndex
from tests.conftest import PlantedIndex
from tests.indexer.scenes import exact_copy, index_library, plant_library


def _paths(found: Duplicates) -> list[frozenset[str]]:
    return [frozenset(m.path for m in group.members) for group in found.groups]


def _check_no_group_mixes_scenes(found: Duplicates, copies_of: dict[str, str]) -> None:
    """Every group holds one scene and its copies (``copies_of``: path -> the original it was made from)."""
    for group in found.groups:
        assert len({copies_of[m.path] for m in group.members}) == 1, group


def _originals(planted: PlantedIndex) -> dict[str, str]:
    originals = {path: path for path in planted.library.copies}
    for original, members in planted.library.groups.items():
        originals.update(dict.fromkeys(members, original))
    return originals


def test_union_joins_pairs_into_components_rooted_at_their_smallest_row() -> None:
    parent = np.arange(8, dtype=np.int64)
    union(parent, np.array([5, 1, 6]), np.array([6, 2, 7]))
    union(parent, np.array([7, 2]), np.array([3, 3]))  # 3 joins {1, 2} and {5, 6, 7}, in one call
    assert roots(parent).tolist() == [0, 1, 1, 1, 4, 1, 1, 1]


def test_near_pairs_finds_every_pair_above_the_threshold_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(duplicates, "BASE_BLOCK_ROWS", 64)
    monkeypatch.setattr(duplicates, "QUERY_BLOCK_ROWS", 16)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 32)).astype(np.float32)
    copies = rng.choice(300, size=40, replace=False)
    vectors[copies[20:]] = vectors[copies[:20]] + 0.05 * rng.standard_normal((20, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    threshold = 0.99
    found = set()
    for left, right in near_pairs(lambda start, stop: vectors[start:stop], len(vectors), threshold):
        found |= set(zip(left.tolist(), right.tolist(), strict=True))
    scores = vectors @ vectors.T
    expected = {(i, j) for i, j in zip(*np.nonzero(scores >= threshold), strict=True) if i < j}
    assert found == expected
    assert len(expected) >= 20


def test_planted_copies_are_grouped_and_unrelated_scenes_are_not(planted_index: PlantedIndex) -> None:
    """The tiny random-weight model sees 32 px: every copy of the same pixels (resized, recompressed, rotated,
    byte-identical) reaches the default threshold; crops need a model that sees more (the slow test below)."""
    with PublishedIndex.open(planted_index.index_dir) as index:
        found = find_duplicates(index)
    assert found.images == len(planted_index.library.copies)
    _check_no_group_mixes_scenes(found, _originals(planted_index))
    copies = planted_index.library.copies
    groups = _paths(found)
    for members in planted_index.library.groups.values():
        same_pixels = {path for path in members if copies[path] != "cropped"}
        assert any(same_pixels <= group for group in groups), same_pixels


def test_members_come_first_member_first_then_by_similarity(planted_index: PlantedIndex) -> None:
    with PublishedIndex.open(planted_index.index_dir) as index:
        found = find_duplicates(index)
        for group in found.groups:
            first, *others = group.members
            assert first.id == min(m.id for m in group.members) and first.similarity == 1.0
            assert [m.similarity for m in others] == sorted((m.similarity for m in others), reverse=True)
            vectors = {m.id: index.embedding(m.id) for m in group.members}
            for member in others:
                assert member.similarity == pytest.approx(float(vectors[first.id] @ vectors[member.id]), abs=1e-5)
    sizes = [(-len(g.members), g.members[0].id) for g in found.groups]
    assert sizes == sorted(sizes)


def test_byte_identical_files_group_as_exact_at_any_threshold(planted_index: PlantedIndex) -> None:
    copies = planted_index.library.copies
    with PublishedIndex.open(planted_index.index_dir) as index:
        found = find_duplicates(index, threshold=1.0)
    exact = {path for path, kind in copies.items() if kind == "exact"}
    assert len(found.groups) == len(exact)
    for group in found.groups:
        assert group.kind == "exact" and all(m.kind == "exact" for m in group.members)
        assert {copies[m.path] for m in group.members} == {"original", "exact"}


def test_a_byte_identical_pair_is_marked_exact_inside_a_near_group(planted_index: PlantedIndex) -> None:
    copies = planted_index.library.copies
    with PublishedIndex.open(planted_index.index_dir) as index:
        found = find_duplicates(index)
    group = next(g for g in found.groups if any(copies[m.path] == "exact" for m in g.members))
    assert group.kind == "near"
    assert {m.path: m.kind for m in group.members if m.kind == "exact"}.keys() == {
        m.path for m in group.members if copies[m.path] in ("original", "exact")
    }


def test_folder_compares_only_the_images_under_it(planted_index: PlantedIndex) -> None:
    with PublishedIndex.open(planted_index.index_dir) as index:
        found = find_duplicates(index, folder="copies")
        nowhere = find_duplicates(index, folder="no/such/folder")
    assert found.images == 4 * len(planted_index.library.groups)
    assert all(m.path.startswith("copies/") for g in found.groups for m in g.members)
    assert len(found.groups) == len(planted_index.library.groups)
    assert (nowhere.images, nowhere.groups) == (0, [])


def test_a_threshold_outside_the_range_is_refused(planted_index: PlantedIndex) -> None:
    with PublishedIndex.open(planted_index.index_dir) as index, pytest.raises(ValueError, match="between 0.9 and 1"):
        find_duplicates(index, threshold=0.5)


def test_the_store_answers_for_the_generation_it_serves(planted_index: PlantedIndex, tmp_path: Path) -> None:
    """same_content and stored_vectors read what the open generation holds, not what later builds wrote."""
    library = planted_index.library
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    shutil.copytree(library.root, root)
    shutil.copytree(planted_index.index_dir, index_dir)
    with PublishedIndex.open(index_dir) as before:
        (root / "backup" / "scene_000.jpg").unlink()
        exact_copy(root / "camera" / "scene_010.jpg", root / "backup" / "scene_010.jpg")
        command = ["build", str(root), "--index-dir", str(index_dir), "--model", str(planted_index.model)]
        assert clip_index([*command, "--workers", "0"]) == 0
        with PublishedIndex.open(index_dir) as after:
            old, new = before.same_content(), after.same_content()
        columns = before.photo_columns()
        stored = before.stored_vectors(columns.vec_files, columns.vec_rows)
        assert all(np.array_equal(stored[i], before.embedding(int(image_id))) for i, image_id in enumerate(columns.ids))
        paths_of = {record.path: record.id for record in before.images(columns.ids.tolist()).values()}
    assert sorted([paths_of["camera/scene_000.jpg"], paths_of["backup/scene_000.jpg"]]) in old
    assert not any(paths_of["camera/scene_000.jpg"] in group for group in new)
    assert len(old) == len(new) == 2


def test_cli_prints_the_groups_as_text_and_json(
    planted_index: PlantedIndex, capsys: pytest.CaptureFixture[str]
) -> None:
    assert clip_index(["duplicates", "--index-dir", str(planted_index.index_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["threshold"] == DEFAULT_THRESHOLD and printed["images"] == len(planted_index.library.copies)
    first = printed["groups"][0]
    assert set(first) == {"kind", "members"} and set(first["members"][0]) == {"id", "path", "similarity", "kind"}
    assert clip_index(["duplicates", "--index-dir", str(planted_index.index_dir), "--folder", "copies"]) == 0
    text = capsys.readouterr().out
    assert f"{len(planted_index.library.groups)} group(s) of duplicates among 16 image(s) under copies" in text
    assert "copies/rotated/scene_000.jpg" in text


def test_cli_refuses_a_folder_without_images(planted_index: PlantedIndex, caplog: pytest.LogCaptureFixture) -> None:
    assert clip_index(["duplicates", "--index-dir", str(planted_index.index_dir), "--folder", "nowhere"]) == 1
    assert "no indexed image lies under the folder 'nowhere'" in caplog.text


def test_cli_refuses_a_threshold_out_of_range(planted_index: PlantedIndex, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        clip_index(["duplicates", "--index-dir", str(planted_index.index_dir), "--threshold", "1.5"])
    assert exit_info.value.code == 2
    assert "between 0.9 and 1" in capsys.readouterr().err


@pytest.mark.slow
def test_at_the_default_every_planted_group_is_found_and_none_mixes_scenes_vit_b32(tmp_path: Path) -> None:
    """ViT-B/32's geometry (224 px in 32 px patches), random weights: the smallest model measured under which the
    default threshold finds slight crops too (the tiny model sees 32 px; the demo model, trained on shapes, moves a
    cropped photo far). Each planted group must come out whole, and nothing else."""
    model, _ = clip_model.create_model("ViT-B-32", seed=0)
    checkpoint = clip_model.save_checkpoint(model.eval(), tmp_path / "vit-b-32.safetensors")
    library = plant_library(tmp_path / "photos", scenes=24, planted=6)
    with PublishedIndex.open(index_library(library, tmp_path / "index", checkpoint)) as index:
        found = find_duplicates(index)
    assert sorted(_paths(found), key=sorted) == sorted(library.groups.values(), key=sorted)
