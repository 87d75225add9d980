"""Zero-shot classification: class names + prompt templates -> a linear classifier over image embeddings.

Each class's weight is the mean of its prompts' unit text embeddings, renormalized to unit length (prompt
ensembling, as in the CLIP paper). Classifying scales the cosine similarities as the model was trained to: a model
trained with the softmax contrastive loss (CLIP, the XLM-RoBERTa CLIPs) gets a softmax over the classes, so the
probabilities of one image sum to 1; a model trained with the sigmoid loss (SigLIP, whose pair logit has a learned
bias) gets each class's own sigmoid, the model's probability that image and class text match: independent, so
several classes, or none, can be likely.

A prompt template is literal text around exactly one empty field ``{}`` that the class name fills; ``{{`` and ``}}``
stand for literal braces. Templates are parsed (:func:`split_template`), never passed to ``str.format``: a field
with a name, index, attribute, conversion or format spec (``{0}``, ``{x}``, ``{.__class__}``, ``{!r}``,
``{:>200000000}``) is refused, so a prompt is never longer than its template plus the class name.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache, partial
from importlib import resources
from string import Formatter

import torch

from .factory import tokenizer_for
from .model import ImageTextModel
from .siglip import SigLIP

TEMPLATE_SETS = ("imagenet_80", "imagenet_7")  # the CLIP paper's 80 ImageNet prompts and its 7-prompt subset
DEFAULT_TEMPLATE_SET = "imagenet_80"
TEXT_BATCH_SIZE = 256  # prompts encoded per forward pass while building a classifier
MAX_TEMPLATE_CHARS = 1000  # longest prompt template, in characters
# The template rule of split_template as a regular expression (for API schemas and form validation in clients):
# literal characters or escaped braces around exactly one "{}". Both must accept exactly the same strings.
TEMPLATE_PATTERN = r"^(?:[^{}]|\{\{|\}\})*\{\}(?:[^{}]|\{\{|\}\})*$"
TEMPLATE_EXAMPLE_CHARS = 60  # how much of a refused template its error message quotes

Tokenize = Callable[[Sequence[str]], torch.Tensor]


@lru_cache
def prompt_templates(name: str = DEFAULT_TEMPLATE_SET) -> tuple[str, ...]:
    """A shipped template set; each template holds one ``{}`` that the class name replaces."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; choose one of {', '.join(TEMPLATE_SETS)}")
    text = (resources.files("clip_model") / "data" / "prompt_templates.json").read_text(encoding="utf-8")
    return tuple(json.loads(text)[name])


def build_zero_shot_classifier(
    model: ImageTextModel,
    classnames: Sequence[str],
    templates: Sequence[str] | None = None,
    tokenize: Tokenize | None = None,
) -> torch.Tensor:
    """Class weights for :func:`classify`.

    Args:
        classnames: C labels, e.g. ``["cat", "dog"]``.
        templates: T format strings with one ``{}``; defaults to the 80 ImageNet templates.
        tokenize: texts -> LongTensor [N, context_length]; defaults to the model's own tokenizer
            (:func:`clip_model.tokenizer_for`) at its context length.
    Returns:
        float tensor [embed_dim, C], each column unit-norm, on the model's device.
    """
    prompts = zero_shot_prompts(classnames, templates)
    if tokenize is None:
        tokenize = partial(tokenizer_for(model), context_length=model.context_length)
    device = next(model.parameters()).device
    with torch.no_grad():
        chunks = [
            model.encode_text(tokenize(prompts[i : i + TEXT_BATCH_SIZE]).to(device), normalize=True)
            for i in range(0, len(prompts), TEXT_BATCH_SIZE)
        ]
    return ensemble_prompts(torch.cat(chunks), len(classnames))


def split_template(template: str) -> tuple[str, str]:
    """The literal text before and after the one ``{}`` of a prompt template, braces unescaped.

    Raises ValueError, quoting the template, unless it has at most ``MAX_TEMPLATE_CHARS`` characters and exactly one
    replacement field written ``{}`` (no name, index, attribute, conversion or format spec; ``{{``/``}}`` for braces).
    """
    quoted = repr(template[:TEMPLATE_EXAMPLE_CHARS]) + ("..." if len(template) > TEMPLATE_EXAMPLE_CHARS else "")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"template {quoted} is {len(template)} characters, the limit is {MAX_TEMPLATE_CHARS}")
    try:
        parts = list(Formatter().parse(template))
    except ValueError as exc:  # a single '{' or '}', or a field left open
        raise ValueError(f"template {quoted} is not valid: {exc}; write '{{{{' or '}}}}' for a literal brace") from None
    fields = [i for i, (_, field, _, _) in enumerate(parts) if field is not None]
    # Rebuilding the text with every field spelled "{}" gives the template back only if its one field was "{}".
    rebuilt = "".join(_escape(literal) + ("{}" if field is not None else "") for literal, field, _, _ in parts)
    if len(fields) != 1 or rebuilt != template:
        raise ValueError(
            f"template {quoted} must contain exactly one '{{}}' for the class name and no other '{{...}}' field "
            "(no names, indexes, attributes, conversions or format specs); write '{{' or '}}' for a literal brace"
        )
    before = "".join(literal for literal, _, _, _ in parts[: fields[0] + 1])
    after = "".join(literal for literal, _, _, _ in parts[fields[0] + 1 :])
    return before, after


def _escape(literal: str) -> str:
    return literal.replace("{", "{{").replace("}", "}}")


def check_template(template: str) -> str:
    """``template`` itself if :func:`split_template` accepts it; its ValueError otherwise."""
    split_template(template)
    return template


def zero_shot_prompts(classnames: Sequence[str], templates: Sequence[str] | None = None) -> list[str]:
    """The C x T prompts of a classifier, class-major (C blocks of T prompts), each a template with its ``{}``
    replaced by the class name. ValueError for an empty label set, no templates or a template
    :func:`split_template` refuses; ``templates`` defaults to the 80 ImageNet templates."""
    if not classnames:
        raise ValueError("classnames is empty: give at least one label")
    templates = tuple(templates) if templates is not None else prompt_templates()
    if not templates:
        raise ValueError("templates is empty: give at least one, or None for the default set")
    pieces = [split_template(t) for t in templates]
    return [before + name + after for name in classnames for before, after in pieces]


def ensemble_prompts(prompt_embeddings: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class weights from the unit embeddings of :func:`zero_shot_prompts` ``[C * T, D]``: ``[D, C]``, unit columns."""
    per_prompt = prompt_embeddings.view(num_classes, -1, prompt_embeddings.shape[-1])  # [C, T, D]
    weights = torch.nn.functional.normalize(per_prompt.mean(dim=1), dim=-1)  # [C, D]
    return weights.t().contiguous()


def pair_logit_bias(model: ImageTextModel) -> torch.Tensor | None:
    """The learned bias of a sigmoid-trained model's pair logits (SigLIP), a detached scalar tensor; None for a
    softmax-trained model, whose scores over a set of texts only mean something relative to each other."""
    return model.logit_bias.detach() if isinstance(model, SigLIP) else None


def zero_shot_probabilities(
    image_features: torch.Tensor,
    classifier: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Class probabilities from unit ``image_features`` [B, D] and ``classifier`` [D, C] -> float32 [B, C].

    ``logit_scale`` is the model's (a log: its exp multiplies the cosine). Without ``logit_bias``: a softmax over
    the classes, each row sums to 1. With it (:func:`pair_logit_bias`): ``sigmoid(exp(logit_scale) * cos +
    logit_bias)`` per class, independent probabilities (module docstring)."""
    scale = logit_scale.exp() if isinstance(logit_scale, torch.Tensor) else torch.tensor(logit_scale).exp()
    logits = (scale * image_features @ classifier.to(image_features.dtype)).float()  # [B, C]
    if logit_bias is None:
        return logits.softmax(dim=-1)
    return (logits + torch.as_tensor(logit_bias, dtype=torch.float32)).sigmoid()


def classify(model: ImageTextModel, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Class probabilities for preprocessed images.

    Args:
        images: [B, 3, R, R] float, as produced by the model's preprocess.
        classifier: [embed_dim, C] from :func:`build_zero_shot_classifier`.
    Returns:
        float tensor [B, C]: rows that sum to 1, or independent probabilities for a sigmoid-trained model (module
        docstring).
    """
    with torch.no_grad():
        features = model.encode_image(images.to(classifier.device), normalize=True)  # [B, D]
        return zero_shot_probabilities(features, classifier, model.logit_scale, pair_logit_bias(model))
