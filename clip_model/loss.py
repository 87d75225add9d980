"""Contrastive losses for training CLIP: the symmetric InfoNCE loss of the CLIP paper and the sigmoid (SigLIP) loss.

Contracts:

* Features are ``[B, D]`` rows, L2-normalized by the caller (``encode_*(..., normalize=True)``); row ``i`` of the
  images and row ``i`` of the texts are a positive pair, every other pairing is a negative.
* ``logit_scale`` is the model's learned log-temperature parameter; the scale applied is ``exp(logit_scale)``
  clamped at ``MAX_LOGIT_SCALE`` (100, as in the CLIP paper), so the parameter can be trained unconstrained.
* With ``gather=True`` under ``torch.distributed`` (gloo on CPU, nccl on GPU), every rank gathers the rows of all
  ranks and computes the loss of the whole global batch: the value is the one-process loss over the concatenated
  batch on every rank. Gathered copies of other ranks' rows carry no gradient, the local rows keep theirs, so each
  rank's gradient with respect to its own rows is exactly the one-process gradient for those rows. The scalars
  ``logit_scale`` and ``logit_bias`` are replicated, so every rank would backpropagate the whole global loss into
  them: their gradient is divided by the world size (the value is untouched). Parameter gradients are then the
  one-process gradients when the ranks' gradients are SUMMED; DistributedDataParallel averages them, so a training
  loop under DDP backpropagates ``world_size * loss`` (see ``clip_model.train``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

MAX_LOGIT_SCALE = 100.0  # exp(logit_scale) is clamped here, as in the CLIP paper


def scaled(logit_scale: torch.Tensor) -> torch.Tensor:
    """``exp(logit_scale)`` clamped at ``MAX_LOGIT_SCALE`` (the gradient is zero while clamped)."""
    return logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All ranks' ``[B, D]`` rows concatenated in rank order ``[world * B, D]``; only the local slice has a gradient.

    Every rank must pass the same batch size. Outside torch.distributed this returns ``features`` unchanged.
    """
    rank, world = _world()
    if world == 1:
        return features
    gathered = [torch.empty_like(features) for _ in range(world)]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[rank] = features  # the local rows keep their autograd history
    return torch.cat(gathered)


def _global_batch(
    image_features: torch.Tensor, text_features: torch.Tensor, gather: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The rows the loss is computed over and the number of ranks that compute it (1 without ``gather``)."""
    world = _world()[1] if gather else 1
    if world == 1:
        return image_features, text_features, 1
    return gather_features(image_features), gather_features(text_features), world


def _replicated(scalar: torch.Tensor, world: int) -> torch.Tensor:
    """``scalar`` with the same value and its gradient divided by ``world``: each of ``world`` ranks backpropagates the
    whole global loss through it, so the ranks' gradients summed are the one-process gradient."""
    if world == 1:
        return scalar
    detached = scalar.detach()
    return detached + (scalar - detached) / world  # exactly ``scalar`` in value (finite ``scalar``)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather: bool = True,
) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross entropy over scaled cosine similarities.

    Args:
        image_features, text_features: ``[B, D]`` unit rows; row i of each is a positive pair.
        logit_scale: scalar log-temperature (the model's ``logit_scale`` parameter).
        gather: under torch.distributed, use every rank's rows (the global batch of ``world * B`` pairs).
    Returns:
        scalar loss over the (global) batch.
    """
    image_features, text_features, world = _global_batch(image_features, text_features, gather)
    logits_per_image = scaled(_replicated(logit_scale, world)) * image_features @ text_features.t()  # [N, N]
    labels = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    gather: bool = True,
) -> torch.Tensor:
    """Sigmoid loss (SigLIP): every image-text pairing of the (global) batch is an independent binary decision.

    ``-(1/N) * sum over all N x N pairs of log sigmoid(z * (scale * cos + bias))``, ``z = +1`` for the N positive
    pairs and ``-1`` for the others. ``logit_bias`` is a learned scalar (SigLIP starts it at -10 and ``logit_scale``
    at log 10).
    """
    image_features, text_features, world = _global_batch(image_features, text_features, gather)
    scale, bias = scaled(_replicated(logit_scale, world)), _replicated(logit_bias, world)
    logits = scale * image_features @ text_features.t() + bias  # [N, N]
    signs = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(signs * logits).sum() / logits.shape[0]
