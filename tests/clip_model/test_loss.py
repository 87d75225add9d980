"""The contrastive losses: direct computations on small inputs, symmetry, the clamp, gradients, and the distributed
contract (2 gloo processes give the one-process loss and gradients over the concatenated batch)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clip_model.loss import MAX_LOGIT_SCALE, clip_loss, gather_features, scaled, siglip_loss
from tests.support import free_port

LOG_MAX_SCALE = math.log(MAX_LOGIT_SCALE)
SCALES_BELOW_CLAMP = (0.0, math.log(10), LOG_MAX_SCALE - 0.5)
SCALES_ABOVE_CLAMP = (LOG_MAX_SCALE + 0.5, 6.0)
BATCH_SIZES = (1, 2, 5, 16)
EMBED_DIM = 8

WORLD_SIZE = 2
GLOBAL_BATCH = 8  # rank r holds rows [r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
LOCAL_BATCH = GLOBAL_BATCH // WORLD_SIZE
INPUT_DIM = 6
CHILD_TIMEOUT_S = 60.0

RankResults = list[dict[str, dict[str, Any]]]  # per rank, per loss: what the rank saved


def unit_rows(n: int, d: int = EMBED_DIM, seed: int = 0) -> torch.Tensor:
    """``[n, d]`` random float64 unit rows."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _neg_log_sigmoid(x: float) -> float:
    """``-log(1 / (1 + exp(-x)))``, without overflow on either side."""
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


def _cosines(images: torch.Tensor, texts: torch.Tensor) -> list[list[float]]:
    a, b = images.tolist(), texts.tolist()
    return [[math.fsum(x * y for x, y in zip(row_a, row_b, strict=True)) for row_b in b] for row_a in a]


def direct_clip_loss(images: torch.Tensor, texts: torch.Tensor, scale: float) -> float:
    """The CLIP loss written out: mean over pairs of the image->text and text->image cross entropies, halved."""
    cos = _cosines(images, texts)
    n = len(cos)
    total = 0.0
    for i in range(n):
        row = [scale * cos[i][j] for j in range(n)]  # image i against every text
        column = [scale * cos[j][i] for j in range(n)]  # text i against every image
        total += (_logsumexp(row) - row[i]) + (_logsumexp(column) - column[i])
    return total / (2 * n)


def direct_siglip_loss(images: torch.Tensor, texts: torch.Tensor, scale: float, bias: float) -> float:
    """The SigLIP loss written out: ``sum_ij -log sigmoid(z_ij * (scale * cos_ij + bias)) / N``."""
    cos = _cosines(images, texts)
    n = len(cos)
    pairs = (
        _neg_log_sigmoid((1.0 if i == j else -1.0) * (scale * cos[i][j] + bias)) for i in range(n) for j in range(n)
    )
    return math.fsum(pairs) / n


def _scalar(value: float, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64, requires_grad=requires_grad)


# --- one process: values


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize("logit_scale", SCALES_BELOW_CLAMP + SCALES_ABOVE_CLAMP)
def test_clip_loss_equals_direct_computation(n: int, logit_scale: float) -> None:
    images, texts = unit_rows(n, seed=n), unit_rows(n, seed=100 + n)
    expected = direct_clip_loss(images, texts, min(math.exp(logit_scale), MAX_LOGIT_SCALE))
    loss = clip_loss(images, texts, _scalar(logit_scale), gather=False)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_clip_loss_of_float32_features_matches_float64_direct_computation() -> None:
    images, texts = unit_rows(16, seed=1), unit_rows(16, seed=2)
    loss = clip_loss(images.float(), texts.float(), torch.tensor(math.log(1 / 0.07)), gather=False)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(direct_clip_loss(images, texts, 1 / 0.07), rel=1e-5)


@pytest.mark.parametrize("n", BATCH_SIZES)
@pytest.mark.parametrize(("logit_scale", "logit_bias"), [(0.0, 0.0), (math.log(10), -10.0), (LOG_MAX_SCALE + 1, 3.0)])
def test_siglip_loss_equals_direct_computation(n: int, logit_scale: float, logit_bias: float) -> None:
    images, texts = unit_rows(n, seed=n), unit_rows(n, seed=100 + n)
    expected = direct_siglip_loss(images, texts, min(math.exp(logit_scale), MAX_LOGIT_SCALE), logit_bias)
    loss = siglip_loss(images, texts, _scalar(logit_scale), _scalar(logit_bias), gather=False)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_scaled_is_exp_clamped_at_max_logit_scale() -> None:
    assert scaled(_scalar(math.log(10))).item() == pytest.approx(10.0)
    assert scaled(_scalar(LOG_MAX_SCALE + 0.5)).item() == MAX_LOGIT_SCALE
    assert scaled(_scalar(50.0)).item() == MAX_LOGIT_SCALE


# --- one process: properties and gradients


@pytest.mark.parametrize("loss_fn", ["clip", "siglip"])
def test_swapping_images_and_texts_gives_the_same_loss(loss_fn: str) -> None:
    images, texts = unit_rows(7, seed=3), unit_rows(7, seed=4)
    t, b = _scalar(math.log(20)), _scalar(-2.0)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return clip_loss(x, y, t, gather=False) if loss_fn == "clip" else siglip_loss(x, y, t, b, gather=False)

    torch.testing.assert_close(loss(images, texts), loss(texts, images), rtol=1e-12, atol=1e-12)


def test_perfectly_aligned_pairs_at_large_scale_have_near_zero_loss() -> None:
    g = torch.Generator().manual_seed(13)
    orthonormal, _ = torch.linalg.qr(torch.randn(EMBED_DIM, EMBED_DIM, generator=g, dtype=torch.float64))  # unit rows
    loss = clip_loss(orthonormal, orthonormal.clone(), _scalar(LOG_MAX_SCALE), gather=False)
    assert 0 <= loss.item() < 1e-30
    random_pairs = clip_loss(orthonormal, orthonormal.flip(0), _scalar(LOG_MAX_SCALE), gather=False)
    assert random_pairs.item() > 10  # the positives are orthogonal to their partner: far from zero


@pytest.mark.parametrize("logit_scale", SCALES_BELOW_CLAMP)
def test_clip_loss_gradients_match_finite_differences(logit_scale: float) -> None:
    images, texts = unit_rows(4, d=3, seed=5), unit_rows(4, d=3, seed=6)
    inputs = (images.requires_grad_(), texts.requires_grad_(), _scalar(logit_scale, requires_grad=True))
    assert torch.autograd.gradcheck(lambda x, y, t: clip_loss(x, y, t, gather=False), inputs)


@pytest.mark.parametrize(("logit_scale", "logit_bias"), [(0.0, 0.0), (math.log(10), -10.0), (LOG_MAX_SCALE - 0.5, 2.0)])
def test_siglip_loss_gradients_match_finite_differences(logit_scale: float, logit_bias: float) -> None:
    images, texts = unit_rows(4, d=3, seed=7), unit_rows(4, d=3, seed=8)
    inputs = (images.requires_grad_(), texts.requires_grad_(), _scalar(logit_scale, True), _scalar(logit_bias, True))
    assert torch.autograd.gradcheck(lambda x, y, t, b: siglip_loss(x, y, t, b, gather=False), inputs)


@pytest.mark.parametrize("logit_scale", SCALES_ABOVE_CLAMP)
def test_clamped_logit_scale_has_zero_gradient(logit_scale: float) -> None:
    images, texts = unit_rows(5, seed=9), unit_rows(5, seed=10)
    t, b = _scalar(logit_scale, requires_grad=True), _scalar(-1.0)
    clip_loss(images, texts, t, gather=False).backward()
    assert t.grad is not None and t.grad.item() == 0.0
    t.grad = None
    siglip_loss(images, texts, t, b, gather=False).backward()
    assert t.grad is not None and t.grad.item() == 0.0


def test_logit_scale_below_clamp_has_a_gradient() -> None:
    images, texts = unit_rows(5, seed=9), unit_rows(5, seed=10)
    t = _scalar(LOG_MAX_SCALE - 0.5, requires_grad=True)
    clip_loss(images, texts, t, gather=False).backward()
    assert t.grad is not None and t.grad.item() != 0.0


# --- outside torch.distributed


def test_gather_features_outside_torch_distributed_returns_its_input() -> None:
    assert not dist.is_initialized()
    features = unit_rows(3).requires_grad_()
    assert gather_features(features) is features


def test_gather_without_a_process_group_equals_no_gather() -> None:
    assert not dist.is_initialized()
    images, texts = unit_rows(6, seed=11), unit_rows(6, seed=12)
    t, b = _scalar(math.log(10)), _scalar(-3.0)
    assert torch.equal(clip_loss(images, texts, t), clip_loss(images, texts, t, gather=False))
    assert torch.equal(siglip_loss(images, texts, t, b), siglip_loss(images, texts, t, b, gather=False))


# --- two gloo processes against one process over the concatenated batch


def _problem() -> dict[str, torch.Tensor]:
    """The same global problem in every process (fixed seed): fixed inputs, a linear "model" per modality mapping them
    to unit features, the shared logit scale and bias, and leaf feature tensors for the feature-gradient check."""
    g = torch.Generator().manual_seed(1234)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "image_inputs": randn(GLOBAL_BATCH, INPUT_DIM),
        "text_inputs": randn(GLOBAL_BATCH, INPUT_DIM),
        "image_proj": randn(INPUT_DIM, EMBED_DIM).requires_grad_(),
        "text_proj": randn(INPUT_DIM, EMBED_DIM).requires_grad_(),
        "logit_scale": _scalar(math.log(10), requires_grad=True),
        "logit_bias": _scalar(-2.0, requires_grad=True),
        "images": F.normalize(randn(GLOBAL_BATCH, EMBED_DIM), dim=-1).requires_grad_(),
        "texts": F.normalize(randn(GLOBAL_BATCH, EMBED_DIM), dim=-1).requires_grad_(),
    }


PARAMETERS = ("image_proj", "text_proj", "logit_scale", "logit_bias")


def _loss(name: str, p: dict[str, torch.Tensor], images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    if name == "clip":
        return clip_loss(images, texts, p["logit_scale"])
    return siglip_loss(images, texts, p["logit_scale"], p["logit_bias"])


def _model_loss(name: str, p: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
    images = F.normalize(p["image_inputs"][rows] @ p["image_proj"], dim=-1)
    texts = F.normalize(p["text_inputs"][rows] @ p["text_proj"], dim=-1)
    return _loss(name, p, images, texts)


def _parameter_grads(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    grads = {}
    for key in PARAMETERS:
        grad = p[key].grad
        grads[key] = torch.zeros_like(p[key]) if grad is None else grad.clone()  # clip_loss ignores logit_bias
        p[key].grad = None
    return grads


def _one_process(name: str) -> dict[str, Any]:
    """Loss and gradients of one process over the whole global batch (no process group)."""
    p, q = _problem(), _problem()  # separate copies, so that the two backward passes do not mix parameter gradients
    feature_loss = _loss(name, p, p["images"], p["texts"])
    feature_loss.backward()
    model_loss = _model_loss(name, q, slice(None))
    model_loss.backward()
    return {"loss": feature_loss.detach(), "model_loss": model_loss.detach(), "images_grad": p["images"].grad,
            "texts_grad": p["texts"].grad, "parameter_grads": _parameter_grads(q)}  # fmt: skip


def _rank_results(name: str, rank: int) -> dict[str, Any]:
    p, q = _problem(), _problem()  # separate copies, so that the backward passes do not mix parameter gradients
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    # leaf features: this rank passes its rows (a view), so p["images"].grad shows which rows received a gradient
    feature_loss = _loss(name, p, p["images"][rows], p["texts"][rows])
    feature_loss.backward()
    # the model: parameter gradients of this rank, SUMMED over ranks
    model_loss = _model_loss(name, q, rows)
    model_loss.backward()
    summed = _parameter_grads(q)
    for grad in summed.values():
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
    # DDP semantics: backpropagate world_size * loss, then AVERAGE over ranks
    (WORLD_SIZE * _model_loss(name, q, rows)).backward()
    averaged = _parameter_grads(q)
    for grad in averaged.values():
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        grad /= WORLD_SIZE
    return {"loss": feature_loss.detach(), "model_loss": model_loss.detach(), "images_grad": p["images"].grad,
            "texts_grad": p["texts"].grad, "summed_grads": summed, "ddp_grads": averaged}  # fmt: skip


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    """A spawned rank: computes both losses and saves what the parent checks (assertions here would not fail pytest)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE)
    try:
        results = {name: _rank_results(name, rank) for name in ("clip", "siglip")}
        results["world"] = {"rank": dist.get_rank(), "gathered": gather_features(torch.full((2, 3), float(rank)))}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> RankResults:
    out_dir = tmp_path_factory.mktemp("loss_ranks")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # inherited by the spawned ranks before torch is imported there
        context = mp.start_processes(
            _distributed_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
        )
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not context.join(timeout=1.0):  # re-raises a rank's exception with its traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} ranks did not finish in {CHILD_TIMEOUT_S:.0f}s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


def test_gather_features_concatenates_ranks_in_rank_order(rank_results: RankResults) -> None:
    expected = torch.cat([torch.full((2, 3), float(r)) for r in range(WORLD_SIZE)])
    for rank, results in enumerate(rank_results):
        assert results["world"]["rank"] == rank
        assert torch.equal(results["world"]["gathered"], expected)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_every_rank_returns_the_one_process_loss(rank_results: RankResults, name: str) -> None:
    expected = _one_process(name)
    for results in rank_results:
        _close(results[name]["loss"], expected["loss"])
        _close(results[name]["model_loss"], expected["model_loss"])


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_each_rank_gets_the_one_process_gradient_of_its_own_rows_only(rank_results: RankResults, name: str) -> None:
    expected = _one_process(name)
    for rank, results in enumerate(rank_results):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for key in ("images_grad", "texts_grad"):
            grad, want = results[name][key], expected[key]
            _close(grad[rows], want[rows])
            others = torch.ones(GLOBAL_BATCH, dtype=torch.bool)
            others[rows] = False
            assert torch.count_nonzero(grad[others]) == 0  # the gathered copies of other ranks' rows carry none


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("reduction", ["summed_grads", "ddp_grads"])
def test_parameter_gradients_reduced_over_ranks_equal_one_process(
    rank_results: RankResults, name: str, reduction: str
) -> None:
    expected = _one_process(name)["parameter_grads"]
    for results in rank_results:
        grads = results[name][reduction]
        assert set(grads) == set(PARAMETERS)
        for key in PARAMETERS:
            _close(grads[key], expected[key])
