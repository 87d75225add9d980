"""The server's device setting (CLIPSEARCH_DEVICE, clip-serve --device): checked against this machine when the
settings are read, so a device it lacks or a precision it cannot run there stops the start with the reason; and
/api/stats says where the encoders run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

import clip_model
from app.cli import main as serve
from app.main import create_app
from app.settings import Settings
from tests.app.conftest import IndexedFolder


def fake_cuda(monkeypatch: pytest.MonkeyPatch, devices: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)


def test_the_default_is_auto_with_the_precision_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch, 0)
    settings = Settings(index_dir=tmp_path)
    assert (settings.device, settings.precision) == ("auto", None)
    assert settings.placement() == clip_model.Placement(torch.device("cpu"), "fp32")  # the CPU server as before
    fake_cuda(monkeypatch, 1)
    assert settings.placement() == clip_model.Placement(torch.device("cuda:0"), "fp16")
    assert Settings(index_dir=tmp_path, device="CUDA").device == "cuda:0"  # normal form


def test_the_environment_sets_the_device_and_a_refused_one_names_the_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_cuda(monkeypatch, 0)
    monkeypatch.setenv("CLIPSEARCH_INDEX_DIR", str(tmp_path))
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "cpu")
    monkeypatch.setenv("CLIPSEARCH_PRECISION", "int8")
    assert Settings().placement() == clip_model.Placement(torch.device("cpu"), "int8")
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "cuda")
    with pytest.raises(ValidationError, match=r"device 'cuda' \(--device / CLIPSEARCH_DEVICE\) asks for CUDA"):
        Settings()
    fake_cuda(monkeypatch, 1)  # auto finds CUDA, int8 stays asked for
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "auto")
    with pytest.raises(ValidationError, match=r"'int8' \(--precision / CLIPSEARCH_PRECISION\) runs on the CPU only"):
        Settings()
    monkeypatch.setenv("CLIPSEARCH_DEVICE", "gpu")
    with pytest.raises(ValidationError, match=r"is not one of auto, cpu, cuda, cuda:N"):
        Settings()


def test_clip_serve_refuses_to_start_on_a_device_this_machine_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_cuda(monkeypatch, 0)
    assert serve(["--index-dir", str(tmp_path), "--device", "cuda:1"]) == 2
    error = capsys.readouterr().err
    assert "invalid settings: CLIPSEARCH_DEVICE (--device): " in error and "asks for CUDA" in error
    assert serve(["--index-dir", str(tmp_path), "--device", "cpu", "--precision", "fp16"]) == 2
    assert "'fp16' (--precision / CLIPSEARCH_PRECISION) runs on CUDA only" in capsys.readouterr().err


def test_stats_say_where_the_encoders_run(indexed: IndexedFolder, tmp_path: Path) -> None:
    settings = indexed.settings(tmp_path, device="cpu", precision="int8")
    with TestClient(create_app(settings, watch=False)) as client:
        stats = client.get("/api/stats").json()
    assert stats["ready"] and (stats["device"], stats["precision"]) == ("cpu", "int8")
    empty = indexed.settings(tmp_path, index_dir=tmp_path / "nothing", device="cpu")
    with TestClient(create_app(empty, watch=False)) as client:
        stats = client.get("/api/stats").json()
    assert not stats["ready"] and (stats["device"], stats["precision"]) == ("cpu", "fp32")  # also before an index
