"""The CUDA path on a real GPU: fp16 (and fp32) embeddings on CUDA against fp32 on the CPU, the indexer and the Ray
engine encoding on CUDA, and the indexing throughput there (ViT-B/32 and ViT-L/14, random weights).

Skipped where torch finds no CUDA device. On a GPU machine: ``pytest tests/clip_model/test_cuda.py
--junitxml=cuda.xml``. Every test names its device, so ``CLIPSEARCH_DEVICE=cpu`` (which keeps the rest of the suite
on the CPU there) does not move these. The throughput tests record their images/s as properties of the report
(``record_property``) and log them. Agreement is measured as the cosine of each row with the CPU's fp32 row; random
weights map inputs to nearby directions, so the rows centred on their batch mean are compared too and recorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import clip_model
from tests.support import save_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

logger = logging.getLogger(__name__)

AGREEMENT = 0.999  # least cosine of an fp16 CUDA row with the CPU's fp32 row
FP32_AGREEMENT = 0.9999  # fp32 on CUDA: cuDNN may run the patch convolution in TF32
PHOTOS = 1024  # photos the throughput tests index
PHOTO_SIZE = (1600, 1200)  # pixels, the bench's generator (bench.bench_indexer.photo_folder)
ENCODE_BATCH = 256  # images per call when timing the encoder alone
ENCODE_ROUNDS = 8  # timed calls after one warm-up


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Checkpoints with random weights: the tests' tiny CLIP and ViT-B/32 (seed 0)."""
    folder = tmp_path_factory.mktemp("cuda-models")
    vit, _ = clip_model.create_model("ViT-B-32", seed=0)
    yield {
        "tiny": save_tiny_model(folder / "tiny.safetensors", seed=0),
        "ViT-B-32": clip_model.save_checkpoint(vit.eval(), folder / "vit-b-32.safetensors"),
    }


def cosines(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(least row cosine, least row cosine after centring both on ``want``'s batch mean)."""
    centre = want.mean(dim=0, keepdim=True)
    raw = torch.cosine_similarity(got, want).min().item()
    centred = torch.cosine_similarity(got - centre, want - centre).min().item()
    return raw, centred


@pytest.mark.parametrize("name", ["tiny", "ViT-B-32"])
def test_fp16_on_cuda_agrees_with_fp32_on_the_cpu(
    name: str, models: dict[str, Path], record_property: Callable[[str, object], None]
) -> None:
    cpu = clip_model.load_for_inference(models[name], device="cpu")
    gpu = clip_model.load_for_inference(models[name], device="auto")
    assert (gpu.device, gpu.precision, gpu.weights_sha256) == ("cuda:0", "fp16", cpu.weights_sha256)
    assert next(gpu.model.visual.parameters()).device.type == "cuda" and gpu.model.dtype == torch.float16
    size = cpu.preprocess.image_size
    pixels = torch.rand(16, 3, size, size, generator=torch.Generator().manual_seed(0))
    tokens = clip_model.tokenize(["a photo of a cat", "a red square", "two dogs on a beach", "x"])
    with torch.inference_mode():
        for tower, inputs in (("image", pixels), ("text", tokens)):
            encode_cpu = cpu.model.encode_image if tower == "image" else cpu.model.encode_text
            encode_gpu = gpu.model.encode_image if tower == "image" else gpu.model.encode_text
            want, got = encode_cpu(inputs, normalize=True), encode_gpu(inputs, normalize=True)
            assert (got.dtype, got.device.type, got.shape) == (torch.float32, "cpu", want.shape)
            torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got)), atol=1e-6, rtol=0)
            raw, centred = cosines(got, want)
            record_property(f"{name}_{tower}_fp16_cosine", raw)
            record_property(f"{name}_{tower}_fp16_centred_cosine", centred)
            logger.warning("%s %s fp16 vs CPU fp32: cosine >= %.6f (centred %.6f)", name, tower, raw, centred)
            assert raw >= AGREEMENT, (tower, raw)


def test_zero_shot_and_logits_through_the_cuda_model_match_the_cpu(models: dict[str, Path]) -> None:
    """The scalars stay on the CPU, so classify (as the server's /api/classify) and forward mix no devices."""
    cpu = clip_model.load_for_inference(models["ViT-B-32"], device="cpu").model
    gpu = clip_model.load_for_inference(models["ViT-B-32"], device="cuda").model
    labels = ["a photo of a cat", "a photo of a dog", "a diagram"]
    pixels = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = clip_model.classify(cpu, pixels, clip_model.build_zero_shot_classifier(cpu, labels, ["{}"]))
        got = clip_model.classify(gpu, pixels, clip_model.build_zero_shot_classifier(gpu, labels, ["{}"]))
        logits, _ = gpu(pixels, clip_model.tokenize(labels))
    assert got.device.type == "cpu" and logits.device.type == "cpu"
    torch.testing.assert_close(got, want, atol=1e-2, rtol=0)


def test_fp32_on_cuda_agrees_with_the_cpu(models: dict[str, Path]) -> None:
    cpu = clip_model.load_for_inference(models["ViT-B-32"], device="cpu")
    gpu = clip_model.load_for_inference(models["ViT-B-32"], device="cuda", precision="fp32")
    assert (gpu.device, gpu.precision, gpu.model.dtype) == ("cuda:0", "fp32", torch.float32)
    pixels = torch.rand(8, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        raw, _ = cosines(gpu.model.encode_image(pixels, normalize=True), cpu.model.encode_image(pixels, normalize=True))
    assert raw >= FP32_AGREEMENT


def test_int8_on_cuda_is_refused_and_auto_with_int8_too() -> None:
    for device in ("cuda", "auto"):
        with pytest.raises(ValueError, match=r"'int8' \(--precision / CLIPSEARCH_PRECISION\) runs on the CPU only"):
            clip_model.resolve_placement(device, "int8")


def test_the_indexer_builds_on_cuda_with_the_cpus_vectors(models: dict[str, Path], tmp_path: Path) -> None:
    from indexer.cli import main as clip_index
    from indexer.report import index_info
    from tests.indexer.encoding_checks import image_folder, index_vectors

    root = image_folder(tmp_path / "photos")
    common = ["--model", str(models["ViT-B-32"]), "--workers", "2"]
    assert clip_index(["build", str(root), "--index-dir", str(tmp_path / "cpu"), "--device", "cpu", *common]) == 0
    assert clip_index(["build", str(root), "--index-dir", str(tmp_path / "cuda"), "--device", "cuda", *common]) == 0
    stats = index_info(tmp_path / "cuda")["last_run"]["stats"]
    assert (stats["device"], stats["precision"]) == ("cuda:0", "fp16")
    cpu, cuda = index_vectors(tmp_path / "cpu"), index_vectors(tmp_path / "cuda")
    assert cpu.keys() == cuda.keys()
    for path, vector in cpu.items():
        if isinstance(vector, str):
            assert cuda[path] == vector  # the same skip reason
        else:
            assert float(np.dot(vector, cuda[path])) >= AGREEMENT, path


@pytest.mark.slow
def test_the_ray_engine_encodes_on_the_gpus_its_actors_reserve(models: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from indexer.cli import main as clip_index
    from tests.indexer.encoding_checks import image_folder, shard_rows

    root = image_folder(tmp_path / "photos")
    model = ["--model", str(models["tiny"])]
    local = ["encode", str(root), "--out", str(tmp_path / "cpu"), *model, "--device", "cpu", "--workers", "0"]
    assert clip_index(local) == 0
    ray = ["--engine", "ray", "--address", "local", "--gpus-per-worker", "1", "--workers", "1", "--device", "cuda"]
    assert clip_index(["encode", str(root), "--out", str(tmp_path / "ray"), *model, *ray]) == 0
    cpu, gpu = shard_rows(tmp_path / "cpu"), shard_rows(tmp_path / "ray")
    assert cpu.keys() == gpu.keys()
    for path, row in cpu.items():
        assert row[:6] == gpu[path][:6]  # the same file facts and skip reasons
        if row[6] is not None:
            assert float(np.dot(row[6], gpu[path][6])) >= AGREEMENT, path


def encoder_rate(loaded: object, size: int) -> float:
    """images/s of ``LoadedModel.encode`` (what the pipeline calls) on CUDA, on normalized batches in memory."""
    batch = np.random.default_rng(0).standard_normal((ENCODE_BATCH, 3, size, size)).astype(np.float32)
    encode = loaded.encode  # type: ignore[attr-defined]  # indexer.build.LoadedModel
    encode(batch)  # warm-up: cuDNN picks its kernels
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(ENCODE_ROUNDS):
        encode(batch)  # returns CPU arrays: each call waits for its batch
    return ENCODE_ROUNDS * ENCODE_BATCH / (time.perf_counter() - started)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["ViT-B-32", "ViT-L-14"])
def test_indexing_throughput_on_cuda(arch: str, tmp_path: Path, record_property: Callable[[str, object], None]) -> None:
    """The bench's indexer path (bench.bench_indexer: its generated photos, build_index end to end with the
    default plan) on CUDA in fp16, and the encoder alone; recorded, not asserted (bench/README.md holds numbers)."""
    from bench.bench_indexer import photo_folder
    from indexer.build import BuildOptions, build_index, load_model

    model, _ = clip_model.create_model(arch, seed=0)
    checkpoint = clip_model.save_checkpoint(model.eval(), tmp_path / f"{arch}.safetensors")
    del model
    loaded = load_model(str(checkpoint), device="cuda")
    encode = encoder_rate(loaded, loaded.info.preprocess["image_size"])
    del loaded
    torch.cuda.empty_cache()
    root = photo_folder(tmp_path / "work", PHOTOS, *PHOTO_SIZE)
    options = BuildOptions(root, tmp_path / "index", str(checkpoint), device="cuda", batch_size=ENCODE_BATCH)
    started = time.perf_counter()
    stats = build_index(options)
    end_to_end = stats.encoded / (time.perf_counter() - started)
    assert stats.encoded == PHOTOS and (stats.device, stats.precision) == ("cuda:0", "fp16")
    device = torch.cuda.get_device_name(0)
    for key, value in (("encode_images_per_s", encode), ("end_to_end_images_per_s", end_to_end)):
        record_property(f"{arch}_{key}", round(value, 1))
    record_property("device_name", device)
    logger.warning(
        "%s on %s, fp16: encoder alone %.0f images/s (batch %d); build_index end to end %.0f images/s (%d photos "
        "of %dx%d)",
        arch,
        device,
        encode,
        ENCODE_BATCH,
        end_to_end,
        PHOTOS,
        *PHOTO_SIZE,
    )
