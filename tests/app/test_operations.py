"""Readiness, provenance, API keys, CORS, metrics, request ids, the admin reindex, and the hot swap of a newly
published generation under a stream of requests."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.encoder import SearchRequest
from app.logs import JsonFormatter, RequestIdFilter
from app.main import create_app
from clip_model.process_tuning.threads import default_thread_count
from indexer.cli import main as clip_index
from indexer.store import current_generation, read_manifest
from tests.app.conftest import IndexedFolder, build_folder, write_image


def test_livez_and_readyz(client: TestClient) -> None:
    assert client.get("/livez").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["generation"].startswith("g-")


def test_stats_describe_what_is_served(client: TestClient, indexed: IndexedFolder) -> None:
    stats = client.get("/api/stats").json()
    assert stats["images"] == 12 and stats["texts"] == 5 and stats["embed_dim"] == 32
    assert stats["model"] == str(indexed.model) and stats["factory"] == "IDMap2,Flat"
    assert stats["image_root"] == str(indexed.root.resolve()) and stats["built_at"] > 0
    # a flat index is exact: nothing to tune, recall 1 by construction; the reason comes from the indexer's choice
    assert stats["search_params"] == {} and stats["recall_at_10"] == 1.0 and stats["index_reason"]
    cuda = torch.cuda.is_available()  # the default device, auto, runs fp16 on CUDA where there is some
    assert (stats["device"], stats["precision"]) == (("cuda:0", "fp16") if cuda else ("cpu", "fp32"))


def test_not_ready_without_an_index_then_ready_once_one_is_published(indexed: IndexedFolder, tmp_path: Path) -> None:
    root, index_dir = tmp_path / "photos", tmp_path / "index"
    write_image(root / "a.png", (200, 10, 10), seed=0)
    with TestClient(create_app(indexed.settings(tmp_path, index_dir=index_dir), watch=False)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "clip-index build" in ready.json()["reason"]
        search = client.get("/api/search", params={"q": "cat"})
        assert search.status_code == 503 and "no published index" in search.json()["detail"]
        assert search.headers["retry-after"]
        assert client.get("/api/stats").json()["ready"] is False
        assert (
            clip_index(
                ["build", str(root), "--index-dir", str(index_dir), "--model", str(indexed.model), "--workers", "0"]
            )
            == 0
        )
        client.app.state.runtime.refresh()  # type: ignore[attr-defined]  # what the watcher thread does
        assert client.get("/readyz").status_code == 200
        assert len(client.get("/api/search", params={"q": "cat"}).json()["results"]) == 1


def test_stats_report_the_calibrated_search_parameters_of_an_approximate_index(
    indexed: IndexedFolder, tmp_path: Path
) -> None:
    index_dir = tmp_path / "ivf-index"
    build = ["build", str(indexed.root), "--index-dir", str(index_dir), "--model", str(indexed.model)]
    assert clip_index([*build, "--workers", "0", "--factory", "IVF2,Flat"]) == 0
    with TestClient(create_app(indexed.settings(tmp_path, index_dir=index_dir), watch=False)) as client:
        stats = client.get("/api/stats").json()
    assert "IVF2,Flat" in stats["factory"], stats["factory"]
    assert set(stats["search_params"]) == {"nprobe"} and 1 <= stats["search_params"]["nprobe"] <= 2
    assert 0.0 <= stats["recall_at_10"] <= 1.0


def test_only_the_inference_thread_runs_torch_on_several_threads(indexed: IndexedFolder, tmp_path: Path) -> None:
    # a second long-lived OpenMP team would make the inference thread's spin-wait sleep instead
    # (clip_model.process_tuning.threads)
    from tests.app.test_encoder import ThreadCountIndex

    default = default_thread_count()
    with TestClient(create_app(indexed.settings(tmp_path, torch_threads=2), watch=False)) as client:
        runtime = client.app.state.runtime  # type: ignore[attr-defined]
        assert default_thread_count() == 1  # request handlers, the watcher, timers: one torch thread
        index = ThreadCountIndex(runtime.state.encoder.info.embed_dim)
        query = np.eye(1, index.vectors.shape[1], dtype=np.float32)  # [1, D] unit row
        runtime.state.encoder.search_vectors(query, SearchRequest(index, 1))
        assert index.seen == ("clip-inference", 2, 2)
        assert client.get("/api/search", params={"q": "cat"}).status_code == 200
    assert default_thread_count() == default  # closed: the default is back


def test_an_index_built_with_other_weights_is_refused(
    indexed: IndexedFolder, tmp_path: Path, other_app_model: Path
) -> None:
    settings = indexed.settings(tmp_path, model=str(other_app_model))
    with TestClient(create_app(settings, watch=False)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503
        reason = ready.json()["reason"]
        assert str(indexed.model) in reason and "CLIPSEARCH_MODEL" in reason and "--rebuild" in reason
        assert client.get("/api/search", params={"q": "x"}).status_code == 503


def test_a_missing_pinned_model_stops_the_server_from_starting(indexed: IndexedFolder, tmp_path: Path) -> None:
    settings = indexed.settings(tmp_path, model=str(tmp_path / "missing.safetensors"))
    default = default_thread_count()
    with pytest.raises(Exception, match="missing.safetensors"), TestClient(create_app(settings, watch=False)):
        pass
    assert default_thread_count() == default  # a start that failed gives torch's default back (no close follows)


def test_a_corrupt_generation_is_not_served(indexed: IndexedFolder, tmp_path: Path) -> None:
    folder = build_folder(tmp_path / "copy", indexed.model)
    generation = current_generation(folder.index_dir)
    assert generation is not None
    segment = read_manifest(folder.index_dir, generation).segments[-1]["file"]
    target = folder.index_dir / "segments" / segment
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    with TestClient(create_app(folder.settings(tmp_path), watch=False)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "sha256" in ready.json()["reason"]


def test_api_keys(indexed: IndexedFolder, tmp_path: Path) -> None:
    settings = indexed.settings(tmp_path, api_key="reader-secret", admin_api_key="admin-secret")
    with TestClient(create_app(settings, watch=False)) as client:
        assert client.get("/api/search", params={"q": "x"}).status_code == 401
        assert client.get("/api/search", params={"q": "x"}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.get("/api/search", params={"q": "x"}, headers={"X-API-Key": "reader-secret"}).status_code == 200
        assert client.get("/api/search", params={"q": "x", "api_key": "reader-secret"}).status_code == 200
        assert client.get("/api/search", params={"q": "x"}, headers={"X-API-Key": "admin-secret"}).status_code == 200
        assert client.get("/api/admin/reindex", headers={"X-API-Key": "reader-secret"}).status_code == 401
        assert client.get("/api/admin/reindex", headers={"X-API-Key": "admin-secret"}).json()["state"] == "idle"
        for public in ("/livez", "/readyz", "/metrics", "/", "/docs", "/openapi.json"):
            assert client.get(public).status_code == 200, public


def test_admin_endpoints_are_off_without_an_admin_key(client: TestClient) -> None:
    response = client.post("/api/admin/reindex")
    assert response.status_code == 403 and "CLIPSEARCH_ADMIN_API_KEY" in response.json()["detail"]


@pytest.mark.slow  # heavy end to end (seconds): CI runs it, make check leaves it out
def test_admin_reindex_runs_the_indexer_and_the_new_generation_is_served(
    indexed: IndexedFolder, tmp_path: Path
) -> None:
    folder = build_folder(tmp_path / "copy", indexed.model)
    settings = folder.settings(tmp_path, admin_api_key="admin", reload_interval_s=0.1)
    admin = {"X-API-Key": "admin"}
    with TestClient(create_app(settings)) as client:
        before = client.get("/api/stats").json()
        write_image(folder.root / "new" / "added.png", (90, 90, 90), seed=99)
        started = client.post("/api/admin/reindex", headers=admin)
        assert started.status_code == 202 and started.json()["state"] == "running"
        assert client.post("/api/admin/reindex", headers=admin).status_code in (202, 409)
        status = client.app.state.reindexer.wait(timeout=120)  # type: ignore[attr-defined]
        assert status.state == "succeeded", status.log_tail
        assert client.get("/api/admin/reindex", headers=admin).json()["exit_code"] == 0
        deadline = time.monotonic() + 10
        while client.get("/api/stats").json()["generation"] == before["generation"] and time.monotonic() < deadline:
            time.sleep(0.05)
        after = client.get("/api/stats").json()
        assert after["images"] == before["images"] + 1 and after["generation"] != before["generation"]


def test_hot_swap_during_a_stream_of_requests_fails_none(indexed: IndexedFolder, tmp_path: Path) -> None:
    folder = build_folder(tmp_path / "copy", indexed.model)
    settings = folder.settings(tmp_path, reload_interval_s=0.05)
    with TestClient(create_app(settings)) as client:
        first = client.get("/api/stats").json()["generation"]
        stop = threading.Event()
        statuses: list[int] = []
        generations: set[str] = set()

        def stream() -> None:
            while not stop.is_set():
                response = client.get("/api/search", params={"q": "a red square", "k": 50})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    body = response.json()
                    generations.add(body["generation"])
                    assert len({hit["id"] for hit in body["results"]}) == len(body["results"])
                    image_id = body["results"][0]["id"]
                    statuses.append(client.get(f"/api/images/{image_id}/similar").status_code)

        with ThreadPoolExecutor(4) as pool:
            workers = [pool.submit(stream) for _ in range(4)]
            try:
                for round_number, gone in enumerate(("blue/blue_0.jpg", "blue/blue_1.png", "blue/blue_2.webp")):
                    write_image(folder.root / "more" / f"m{round_number}.png", (10, 200, 200), seed=100 + round_number)
                    (folder.root / gone).unlink()
                    assert clip_index(["build", str(folder.root), "--index-dir", str(folder.index_dir),
                                       "--workers", "0", "--model", str(folder.model)]) == 0  # fmt: skip
                    time.sleep(0.3)
            finally:
                stop.set()
            for worker in workers:
                worker.result()
        assert statuses and set(statuses) == {200}, f"{len(statuses)} requests: {sorted(set(statuses))}"
        assert len(generations) >= 2 and first in generations
        assert client.get("/api/stats").json()["images"] == 12


def test_cors_is_off_by_default_and_configurable(indexed: IndexedFolder, tmp_path: Path, client: TestClient) -> None:
    preflight = {"Origin": "https://photos.example", "Access-Control-Request-Method": "GET"}
    assert "access-control-allow-origin" not in client.options("/api/search", headers=preflight).headers
    settings = indexed.settings(tmp_path, cors_origins=["https://photos.example"])
    with TestClient(create_app(settings, watch=False)) as cors_client:
        response = cors_client.options("/api/search", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://photos.example"


def test_metrics_and_request_ids(client: TestClient) -> None:
    response = client.get("/api/search", params={"q": "metrics"}, headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = client.get("/livez", headers={"X-Request-ID": "bad id with spaces"}).headers["x-request-id"]
    assert len(generated) == 32 and " " not in generated
    text = client.get("/metrics").text
    for name in (
        'clipsearch_request_seconds_count{method="GET",route="/api/search",status="200"}',
        'clipsearch_encode_seconds_count{kind="text"}',
        'clipsearch_search_seconds_count{index="images"}',
        'clipsearch_index_vectors{index="images"} 12.0',
    ):
        assert name in text, name


def test_json_logs_carry_the_request_id(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="app.access"):
        client.get("/livez", headers={"X-Request-ID": "req-42"})
    records = [r for r in caplog.records if r.name == "app.access"]
    entry = json.loads(JsonFormatter().format(records[-1]))
    assert entry["request_id"] == "req-42" and entry["status"] == 200 and entry["path"] == "/livez"
    assert entry["level"] == "INFO" and entry["duration_ms"] >= 0
