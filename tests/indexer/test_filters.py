"""Filtered image search in the store: the filtered top-k equals brute force over the filtered subset for exact
indexes and keeps recall@10 >= 0.95 for IVF ones, at every selectivity, through changes and deletions; a
generation's plans are kept per filter, bounded, and shared safely between threads.

The searches here run with an exact-scan threshold of ``SCAN_MAX`` instead of ``EXACT_SCAN_MAX``, so that at
``N`` images about half the filters take each path."""

from __future__ import annotations

import calendar
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from indexer import _faiss_io
from indexer.photo_metadata import PhotoMetadata
from indexer.store import Catalog, ModelInfo, NewImage, PublishedIndex, filters, publish
from indexer.store.filters import FilterPlanner, SearchFilter, SegmentRows, photo_columns
from indexer.store.reader import current_generation, load_generation
from tests.indexer.test_index_choice import clustered

DIM = 32
MODEL = ModelInfo("test-model", "ef" * 32, DIM, {"image_size": 32})
N = 12_000
FOLDERS = 20  # images of cluster c live in folder f"album{c % FOLDERS:02d}": a folder filter follows the clusters
YEAR_2020 = calendar.timegm((2020, 1, 1, 0, 0, 0, 0, 0, 0))
DAY = 86_400
SCAN_MAX = 2048  # the exact-scan threshold of these tests (module docstring)


@pytest.fixture(autouse=True)
def scan_max(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    monkeypatch.setattr(filters, "EXACT_SCAN_MAX", SCAN_MAX)
    yield SCAN_MAX


def build(index_dir: Path, factory: str) -> tuple[dict[int, dict[str, object]], npt.NDArray[np.float32]]:
    """An index of N clustered vectors with varied attributes; returns id -> attributes and the vectors by id."""
    vectors = clustered(N, 3, DIM)
    rng = np.random.default_rng(4)
    widths = rng.choice([640, 1024, 4000], size=N)
    portrait = rng.random(N) < 0.3
    attributes: dict[int, dict[str, object]] = {}
    with Catalog.open(index_dir, create=True) as catalog:
        catalog.set_model(MODEL)
        images, metadata = [], []
        for i in range(N):
            folder = f"album{int(np.argmax(vectors[i, :FOLDERS])):02d}"  # tied to where the vector lies
            width, height = (int(widths[i]), int(widths[i] * 3 // 4))
            if portrait[i]:
                width, height = height, width
            content_hash = f"{i:064x}"
            images.append(NewImage(f"{folder}/img{i:05d}.jpg", 1000, 10**18 + i, content_hash, width, height))
            taken = YEAR_2020 + int(i * 3650 * DAY / N) if i % 10 else None  # every tenth has no EXIF date
            camera = ("Canon", "Canon EOS R5") if i % 3 == 0 else ("Apple", "iPhone 12")
            metadata.append((content_hash, PhotoMetadata(taken, None, *camera, format="jpeg" if i % 4 else "png")))
        with catalog.transaction():
            ids = catalog.add_images(images, vectors)
            catalog.photos.record(metadata)
        for image_id, image, (_, meta) in zip(ids.tolist(), images, metadata, strict=True):
            attributes[image_id] = {"image": image, "meta": meta}
        publish(index_dir, catalog, factory)
    by_id = np.zeros((int(ids.max()) + 1, DIM), dtype=np.float32)
    by_id[ids] = vectors
    return attributes, by_id


def matches(attributes: dict[str, object], where: SearchFilter) -> bool:
    image, meta = attributes["image"], attributes["meta"]
    assert isinstance(image, NewImage) and isinstance(meta, PhotoMetadata)
    folder = image.path.rpartition("/")[0]
    taken = meta.taken_at if meta.taken_at is not None else image.mtime_ns // 10**9
    checks = [
        not where.folders or any(f == "" or folder == f or folder.startswith(f + "/") for f in where.folders),
        where.taken_from is None or taken >= where.taken_from,
        where.taken_until is None or taken < where.taken_until,
        not where.cameras
        or any(c.casefold() in f"{meta.camera_model}".casefold() for c in where.cameras),  # models repeat the make
        not where.formats or meta.format in where.formats,
        where.min_width is None or image.width >= where.min_width,
        where.orientation is None or (where.orientation == "portrait") == (image.width < image.height),
    ]
    return all(checks)


FILTERS = {  # selectivities from about 0.1% to 100%
    "one week": SearchFilter(taken_from=YEAR_2020 + 1000 * DAY, taken_until=YEAR_2020 + 1007 * DAY),
    "one folder, png": SearchFilter(folders=("album07",), formats=("png",)),
    "two folders": SearchFilter(folders=("album03", "album11")),
    "a year": SearchFilter(taken_from=YEAR_2020 + 365 * DAY, taken_until=YEAR_2020 + 730 * DAY),
    "canon, wide": SearchFilter(cameras=("canon",), min_width=1000),
    "landscape": SearchFilter(orientation="landscape"),
    "jpeg": SearchFilter(formats=("jpeg",)),
    "everything": SearchFilter(folders=("",)),
}


@pytest.fixture(scope="module", params=["Flat", pytest.param("IVF64,Flat", marks=pytest.mark.slow)])
def published(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, object]:
    index_dir = tmp_path_factory.mktemp("filters") / "index"
    attributes, by_id = build(index_dir, request.param)
    return index_dir, request.param, (attributes, by_id)


@pytest.mark.parametrize("name", list(FILTERS))
def test_filtered_top_k_is_brute_force_over_the_subset(published: tuple[Path, str, object], name: str) -> None:
    index_dir, factory, (attributes, by_id) = published  # type: ignore[misc]
    where = FILTERS[name]
    subset = np.array(sorted(i for i, a in attributes.items() if matches(a, where)), dtype=np.int64)
    assert len(subset), name
    queries = clustered(40, 77, DIM)
    scores = queries @ by_id[subset].T
    expected = subset[np.argsort(-scores, axis=1, kind="stable")[:, :10]]
    with PublishedIndex.open(index_dir) as index:
        found = [[hit.id for hit in hits] for hits in index.search(queries, 10, where)]
        again = [[hit.id for hit in hits] for hits in index.search(queries, 10, where)]  # with the kept plan
        planned = index.filter_plan(where)
    assert planned.matching == len(subset) and planned.scan == (len(subset) <= SCAN_MAX)
    assert again == found
    assert all(set(row) <= set(subset.tolist()) for row in found)
    if factory == "Flat":
        assert found == expected.tolist(), name
    else:
        recall = np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, expected.tolist(), strict=True)])
        assert recall >= 0.95, (name, len(subset), recall)


def test_the_filters_span_both_plans_and_selectivities_from_a_tenth_of_a_percent(
    published: tuple[Path, str, object],
) -> None:
    _, _, (attributes, _) = published  # type: ignore[misc]
    sizes = {name: sum(matches(a, where) for a in attributes.values()) for name, where in FILTERS.items()}
    assert min(sizes.values()) <= N // 500 and sizes["everything"] == N  # 0.2% .. 100%
    assert sum(0 < n <= SCAN_MAX for n in sizes.values()) >= 3  # scanned exactly
    assert sum(n > SCAN_MAX for n in sizes.values()) >= 3  # searched with a selector and a raised knob


def test_filters_follow_the_generation_through_changes_and_deletions(tmp_path: Path) -> None:
    """After renames into another folder (a new version of each image in a new segment, the old one deleted from
    its segment) and deletions, both plans still give brute force over what the new generation shows; the previous
    generation, still open with its plans kept, goes on answering as before."""
    index_dir = tmp_path / "index"
    build(index_dir, "Flat")
    folder, jpeg = SearchFilter(folders=("album05",)), SearchFilter(formats=("jpeg",))  # scanned, selectors
    queries = clustered(10, 5, DIM)
    with PublishedIndex.open(index_dir) as before:
        old = {w: [[h.id for h in hits] for hits in before.search(queries, 5, w)] for w in (folder, jpeg)}
        moved, deleted = old[folder][0][:3] + old[jpeg][0][:3], old[folder][1][:2] + old[jpeg][1][:2]
        with Catalog.open(index_dir) as catalog:
            with catalog.transaction():
                for image_id in moved:  # renamed: the same vector, now in another folder
                    catalog.move(image_id, f"album99/moved{image_id}.jpg", 1, 1)
                catalog.delete(deleted)
            publish(index_dir, catalog)
            shown, vectors = catalog.embeddings()
        with PublishedIndex.open(index_dir) as after:
            columns = after.photo_columns()
            for where in (folder, jpeg):
                subset = np.isin(shown, columns.ids[columns.mask(where)])
                expected = shown[subset][np.argsort(-(queries @ vectors[subset].T), axis=1, kind="stable")[:, :5]]
                found = [[h.id for h in hits] for hits in after.search(queries, 5, where)]
                assert found == expected.tolist() and not set(deleted) & {i for r in found for i in r}
                assert after.filter_plan(where).scan == (where == folder)
            elsewhere = after.search(queries[:1], 10, SearchFilter(folders=("album99",)))[0]
            assert not set(moved) & {h.id for hits in after.search(queries, 5, folder) for h in hits}
        assert [[h.id for h in hits] for hits in before.search(queries, 5, jpeg)] == old[jpeg]
    assert sorted(h.id for h in elsewhere) == sorted(moved)


def test_a_filter_nothing_matches_returns_no_hits(published: tuple[Path, str, object]) -> None:
    index_dir, _, _ = published
    with PublishedIndex.open(index_dir) as index:
        assert index.search(clustered(3, 1, DIM), 10, SearchFilter(folders=("nowhere",))) == [[], [], []]
        assert index.search(clustered(3, 1, DIM), 10, SearchFilter(min_width=10**6)) == [[], [], []]


def test_a_folder_holds_its_subfolders_only_and_strings_match_by_value() -> None:
    paths = ["a/1.jpg", "a-b/2.jpg", "a/b/3.png", "ab/4.jpg", "5.jpg", "a/b/c/6.heic"]
    cameras = [("Canon", "Canon EOS R5"), ("Apple", "iPhone 12"), (None, None), ("SONY", "ILCE-7M3"), None, None]
    rows = [
        (i + 1, path, 100, 50, 10**18, 1, i, None, *(camera or (None, None)), None)
        for i, (path, camera) in enumerate(zip(paths, cameras, strict=True))
    ]
    columns = photo_columns(rows)

    def ids(**conditions: object) -> list[int]:
        return columns.ids[columns.mask(SearchFilter(**conditions))].tolist()  # type: ignore[arg-type]

    assert ids(folders=("a",)) == [1, 3, 6] and ids(folders=("a/b",)) == [3, 6] and ids(folders=("a/",)) == [1, 3, 6]
    assert (
        ids(folders=("",)) == [1, 2, 3, 4, 5, 6] and ids(folders=("a-b", "ab")) == [2, 4] and ids(folders=("b",)) == []
    )
    assert (
        ids(cameras=("canon",)) == [1] and ids(cameras=("iphone", "sony")) == [2, 4] and ids(cameras=("nikon",)) == []
    )
    assert columns.cameras == ["Canon EOS R5", "Apple iPhone 12", "SONY ILCE-7M3"]  # the make once
    assert ids(formats=("jpeg",)) == [1, 2, 4, 5] and ids(formats=("heif", "png")) == [3, 6]  # from the extension


def test_a_condition_on_many_values_looks_codes_up_as_it_compares_few() -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(-1, 40, 5000).astype(np.int32)  # -1: no value
    for wanted in (np.zeros(40, bool), np.arange(40) == 7, (np.arange(40) >= 5) & (np.arange(40) < 30),
                   np.arange(40) % 3 == 0, np.ones(40, bool)):  # fmt: skip
        expected = np.concatenate(([False], wanted))[codes + 1]
        assert np.array_equal(filters._coded(codes, wanted), expected)


def test_segment_rows_of_a_run_of_ids_and_of_any_ids_give_the_same_members() -> None:
    column_ids = np.array([2, 3, 5, 8, 9, 10, 14], dtype=np.int64)
    keep = np.array([1, 0, 1, 1, 0, 1, 1], dtype=bool)
    by_id = dict(zip(column_ids.tolist(), keep.tolist(), strict=True))
    run = SegmentRows.of(column_ids, np.array([5, 8, 9, 10], dtype=np.int64))
    assert run.rows is None and run.members(keep).tolist() == [True, True, False, True]
    for id_map in ([14, 2, 7, 9, 3], [5, 8, 9, 11], [1], [15, 16], []):  # shuffled, ids not shown, none
        rows = SegmentRows.of(column_ids, np.array(id_map, dtype=np.int64))
        assert rows.members(keep).tolist() == [by_id.get(i, False) for i in id_map], id_map


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_an_allowed_search_returns_only_allowed_positions_less_the_excluded(factory: str) -> None:
    vectors = clustered(4000, 9, DIM)
    ids = np.arange(1, 4001, dtype=np.int64)  # position p holds id p + 1
    index = _faiss_io.build_index(ids, vectors, DIM, factory)
    members = np.zeros(4000, dtype=bool)
    members[9:59] = True  # ids 10..59
    allowed = _faiss_io.Allowed.of(members)
    queries = vectors[3000:3020]  # nearest to themselves, which are not allowed
    params = {"nprobe": 16} if "IVF" in factory else None
    scores, found = _faiss_io.search(index, queries, 10, allowed=allowed, params=params)
    assert allowed.count == 50 and found.size and ((found >= 10) & (found < 60)).all()
    subset = np.flatnonzero(members)
    exact = ids[subset][np.argsort(-(queries @ vectors[subset].T), axis=1, kind="stable")[:, :10]]
    assert np.array_equal(found, exact)  # every list probed: exact
    excluded = _faiss_io.exclusion(index, np.arange(10, 30, dtype=np.int64))
    folded = _faiss_io.Allowed.of(members, excluded)
    _, found = _faiss_io.search(index, queries, 10, allowed=folded, params=params)
    assert folded.count == 30 and ((found >= 30) & (found < 60)).all()
    with pytest.raises(ValueError, match="exclusion over 4000 positions"):
        _faiss_io.Allowed.of(members[:100], excluded)


@pytest.mark.parametrize("factory", ["IVF32,SQ8", "IVF32,Flat"])
@pytest.mark.parametrize("mapped", [False, True])
def test_a_subset_returns_what_its_index_returns_among_the_same_positions(
    factory: str, mapped: bool, tmp_path: Path
) -> None:
    """The copied codes, searched at one nprobe, give the source's filtered results exactly: ids and scores."""
    vectors = clustered(3000, 12, DIM)
    ids = np.arange(3000, dtype=np.int64) * 3 + 7  # ids unlike positions
    built = _faiss_io.build_index(ids, vectors, DIM, factory)
    _faiss_io.set_search_params(built, {"nprobe": 4})
    _faiss_io.write_index(built, tmp_path / "index.faiss")
    index = _faiss_io.read_index(tmp_path / "index.faiss", mapped=mapped)
    assert _faiss_io.is_memory_mapped(index) == mapped
    lists = _faiss_io.ivf_lists(index)
    assert lists is not None
    excluded = _faiss_io.exclusion(index, ids[::7])
    queries = clustered(25, 13, DIM)
    for share in (0.01, 0.2, 0.9):
        members = np.random.default_rng(int(share * 100)).random(3000) < share
        allowed = _faiss_io.Allowed.of(members, excluded)
        copied = _faiss_io.subset(lists, allowed)
        assert copied.count == allowed.count and copied.nbytes >= copied.count * 8
        for params in ({"nprobe": 1}, {"nprobe": 5}, {"nprobe": 32}, None):  # None: the index's own (4)
            expected = _faiss_io.search(index, queries, 10, allowed=allowed, params=params)
            found = _faiss_io.search_subset(copied, queries, 10, params)
            assert np.array_equal(found[1], expected[1]) and np.array_equal(found[0], expected[0]), (share, params)
    empty = _faiss_io.subset(lists, _faiss_io.Allowed.of(np.zeros(3000, dtype=bool)))
    assert empty.count == 0 and _faiss_io.search_subset(empty, queries, 10)[1].shape == (25, 0)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16,Flat", "IVF16,PQ4x4fs"])
def test_indexes_without_plain_lists_have_no_subsets(factory: str) -> None:
    vectors = clustered(1000, 14, DIM)
    assert _faiss_io.ivf_lists(_faiss_io.build_index(np.arange(1000), vectors, DIM, factory)) is None


def test_the_nprobe_rule_raises_ivf_sublinearly_and_hnsw_linearly() -> None:
    vectors = clustered(2000, 4, DIM)
    ids = np.arange(2000, dtype=np.int64)
    ivf = _faiss_io.build_index(ids, vectors, DIM, "IVF64,Flat")
    _faiss_io.set_search_params(ivf, {"nprobe": 4})
    hnsw = _faiss_io.build_index(ids, vectors, DIM, "HNSW16,Flat")
    assert filters.boosted_params(ivf, {}, 1.0) == {}
    assert filters.boosted_params(ivf, {}, 10.0) == {"nprobe": int(np.ceil(4 * 10**filters.NPROBE_EXPONENT))}
    assert filters.boosted_params(ivf, {}, 1e6) == {"nprobe": 64}  # at most every list
    assert filters.boosted_params(hnsw, {}, 3.0) == {"efSearch": 3 * _faiss_io.HNSW_EF_SEARCH}
    assert filters.boosted_params(_faiss_io.build_index(ids, vectors, DIM, "Flat"), {}, 10.0) == {}


def planner_of(index_dir: Path, index: PublishedIndex, **bounds: int) -> FilterPlanner:
    """A planner over ``index``'s generation with the given bounds (the searches' own planner has the defaults)."""
    generation = current_generation(index_dir)
    assert generation is not None
    segments = load_generation(index_dir, generation, verify_checksums=False).segments
    return FilterPlanner(index.photo_columns(), segments, index.stored_vectors, **bounds)


def test_a_generation_keeps_the_plans_of_its_latest_filters_within_its_bounds(
    published: tuple[Path, str, object],
) -> None:
    index_dir, _, _ = published
    weeks = [SearchFilter(taken_from=YEAR_2020 + d * DAY, taken_until=YEAR_2020 + (d + 7) * DAY) for d in range(5)]
    with PublishedIndex.open(index_dir) as index:
        assert index.filter_plan(weeks[0]) is index.filter_plan(weeks[0])  # made once, then kept
        planner = planner_of(index_dir, index, max_entries=3)
        for where in weeks[:4]:
            planner.plan(where)
        planner.plan(weeks[1])  # used again: the newest
        planner.plan(weeks[4])
        assert len(planner) == 3 and [w in planner for w in weeks] == [False, True, False, True, True]
        scanned = planner.plan(weeks[1])
        assert scanned.scan and scanned.vectors is not None and planner.nbytes >= scanned.vectors.nbytes
        by_bytes = planner_of(index_dir, index, max_bytes=2 * scanned.nbytes + 100)
        for where in weeks:
            by_bytes.plan(where)
        assert len(by_bytes) <= 2 and by_bytes.nbytes <= 2 * scanned.nbytes + 100 and weeks[4] in by_bytes
        too_big = planner_of(index_dir, index, max_bytes=10)
        assert too_big.plan(weeks[0]).matching == scanned.matching and len(too_big) == 0 and too_big.nbytes == 0


@pytest.mark.slow
def test_ivf_segments_searched_through_copies_or_selectors_give_the_same_hits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A filter's IVF segments are copied while the copies fit ``SUBSET_MAX_BYTES``, else searched with selectors;
    the hits are the same (over a generation of two segments, one with deletions)."""
    index_dir = tmp_path / "index"
    build(index_dir, "IVF64,SQ8")
    with Catalog.open(index_dir) as catalog:
        with catalog.transaction():
            catalog.delete(list(range(100, 400)))
            catalog.add_images(
                [NewImage(f"album99/new{i}.jpg", 1, 1, f"{N + i:064x}", 640, 480) for i in range(1500)],
                clustered(1500, 31, DIM),
            )
        publish(index_dir, catalog, "IVF64,SQ8")
    queries = clustered(20, 32, DIM)
    wheres = [w for name, w in FILTERS.items() if name in ("canon, wide", "landscape", "everything")]
    wheres.append(SearchFilter(formats=("jpeg",), min_width=700))
    found = {}
    for room in (filters.SUBSET_MAX_BYTES, 0):
        monkeypatch.setattr(filters, "SUBSET_MAX_BYTES", room)
        with PublishedIndex.open(index_dir) as index:
            plans = [index.filter_plan(w) for w in wheres]
            kinds = {("subset" if p.subset else "selector") for plan in plans for p in plan.segments if p}
            assert kinds == ({"subset"} if room else {"selector"}) and all(len(p.segments) == 2 for p in plans)
            found[room] = [index.search(queries, 10, w) for w in wheres]
    assert found[filters.SUBSET_MAX_BYTES] == found[0]


def test_threads_searching_with_many_filters_at_once_get_what_one_thread_gets(
    published: tuple[Path, str, object],
) -> None:
    index_dir, _, _ = published
    queries = clustered(4, 21, DIM)
    wheres = list(FILTERS.values()) * 3
    with PublishedIndex.open(index_dir) as index:
        expected = [index.search(queries, 10, where) for where in FILTERS.values()] * 3
    with PublishedIndex.open(index_dir) as index:
        found: list[object] = [None] * len(wheres)
        errors: list[BaseException] = []
        start = threading.Barrier(6)

        def work(part: int) -> None:
            start.wait()
            try:
                for i in range(part, len(wheres), 6):
                    found[i] = index.search(queries, 10, wheres[i])
            except BaseException as exc:  # reported by the test
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(part,)) for part in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors and found == expected
