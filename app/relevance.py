"""Relevance: a text query's cosine scores turned into a number in [0, 1] whose meaning does not depend on the
collection or the query. It has one of two kinds, by the served model (:meth:`SigmoidRelevance.of_model` decides):
a model trained with the sigmoid loss (SigLIP) has its own probability that a text and an image match, and
relevance is that (``sigmoid``, last section); any other (CLIP, trained with a softmax over a batch) only ranks, and
relevance is calibrated per generation (``calibrated``, what follows).

Raw CLIP scores have no such meaning: a model's text-image cosines sit in a narrow band of its own (about 0.2-0.35
for ViT-B/32), so a fixed ``min_score`` keeps junk for one model and drops everything for another; and within one
model each text has a level of its own: text and image embeddings lie in separate cones (the modality gap), so
every image of a collection shares a large common part, the collection's mean embedding ``m``, and a query scores
``q . x = q . m + q . (x - m)`` with an image ``x``. The first term, the query's *baseline* (its mean score over the
collection), is the same for every image: it says nothing about which images match, yet it moves all of the query's
scores up or down, which is why a score that is good for one query is poor for another. So relevance reads a
score's *lift*, ``score - q . m``: it ranks a query's images as the score does, and it compares across queries.

What a lift is worth is learnt, per served generation, from queries *unrelated to the collection*: the prompts of
``data/unrelated_prompts.txt`` (short queries for everyday things, animals, food, vehicles, people, places,
events, documents; none names a colour, a shape, a size, a position or the picture itself, words that describe any
image). The server encodes them, takes each one's best score over the collection and its baseline, and so each
one's best lift: what a query for something the collection does not hold reaches with its best match. Their median
is the centre, 1.4826 x their median absolute deviation the spread (robust: the few prompts that do match the
collection, a cow in a farm's photos, move neither much):

    relevance(score) = Phi((score - q . m - median) / spread)

where ``q`` is the query's unit embedding and Phi the standard normal distribution function.

Meaning: relevance r is the share of queries for absent things whose best match lifts less than this result does.
0.5 is where an absent thing's best match typically lands; ``DEFAULT_MIN_RELEVANCE``, 0.99, is 2.33 spreads above
it: about one query in a hundred for something the collection does not hold shows any result above it. The web page
applies that cut-off. ``m`` is the mean of the generation's image embeddings (all of them, or ``MEAN_SAMPLE``
evenly spaced ones: :func:`sample_rows`).

Sigmoid-trained models (SigLIP, SigLIP 2) learn a scale and a bias with their embeddings, and
``sigmoid(exp(logit_scale) * score + logit_bias)`` is the model's own probability that the text describes the image,
the quantity its loss trained (and what ``/api/classify`` gives per label). Relevance is that probability, with no
prompt to encode and nothing fitted per collection; ``min_relevance`` r is the score ``(logit(r) - logit_bias) /
exp(logit_scale)``. Its page cut-off, ``SIGMOID_MIN_RELEVANCE``, is 0.1, not 0.5 ("more likely a match than not"):
the loss sees one matching pair among a batch's tens of thousands, so the probability is learnt against that prior
(the bias starts at -10, odds of 1 in 22,000) and is conservative for a short query naming a kind of thing that
many photos show: transformers' SigLIP documentation gives a clear match, "a photo of 2 cats" on its COCO photo of
two cats, 0.319 with siglip-base-patch16-224, which a 0.5 cut would hide. At 0.1 the model gives the pair odds of
1 to 9, over two thousand times that prior, near which a pair the model sees nothing in common in should stay.
This is not yet measured on real checkpoints (bench/README.md's relevance section measures the demo model, a CLIP).

It applies to text queries (text search, and combined queries whose parts are all texts): image-to-image scores
live on another scale (a photo's nearest neighbours are usually near-copies), so image queries get none. See
bench/README.md, "relevance", for what the default keeps and drops on the demo model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from statistics import NormalDist
from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt

import clip_model

MAD_TO_SIGMA = 1.4826  # a normal distribution's standard deviation per median absolute deviation
MIN_SPREAD = 0.005  # a floor on the spread (cosine units), for collections that all queries score alike
DEFAULT_MIN_RELEVANCE = 0.99  # the web page's cut-off for a calibrated scale (CLIP)
SIGMOID_MIN_RELEVANCE = 0.1  # the web page's cut-off for a sigmoid-trained model's probability (module docstring)
MEAN_SAMPLE = 1 << 14  # image embeddings averaged into the collection's mean (its error is then far below a spread)
PROMPTS_FILE = "unrelated_prompts.txt"

Vector = npt.NDArray[np.float32]
RelevanceKind = Literal["calibrated", "sigmoid"]


def unrelated_prompts() -> list[str]:
    """The calibration prompts, in file order (comment and blank lines left out)."""
    text = resources.files("app").joinpath("data", PROMPTS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def sample_rows(count: int) -> npt.NDArray[np.int64]:
    """Rows of a generation's ``count`` images whose embeddings make its mean: all of them up to ``MEAN_SAMPLE``,
    else ``MEAN_SAMPLE`` evenly spaced ones (ascending)."""
    if count < 1:
        raise ValueError("the collection is empty: it has no mean embedding")
    return np.unique(np.linspace(0, count - 1, min(count, MEAN_SAMPLE)).round().astype(np.int64))


@dataclass(frozen=True)
class QueryRelevance:
    """The relevance of one query's scores: ``Phi((score - centre) / spread)``, where ``centre`` is the query's
    baseline plus the generation's median lift (module docstring)."""

    centre: float
    spread: float

    def relevance(self, score: float) -> float:
        """The relevance of one of the query's cosine ``score``, in [0, 1]."""
        return NormalDist(self.centre, self.spread).cdf(score)

    def min_score(self, relevance: float) -> float:
        """The score that has ``relevance`` (the inverse, for cut-offs): -inf for 0, +inf for 1."""
        if relevance <= 0.0:
            return -math.inf
        if relevance >= 1.0:
            return math.inf
        return NormalDist(self.centre, self.spread).inv_cdf(relevance)


@dataclass(frozen=True, eq=False)
class RelevanceScale:
    """One generation's scale (module docstring): the collection's mean image embedding ``mean`` [D], and the
    median and spread of the unrelated prompts' best lifts."""

    kind: ClassVar[RelevanceKind] = "calibrated"
    default_min_relevance: ClassVar[float] = DEFAULT_MIN_RELEVANCE

    mean: Vector
    median: float
    spread: float
    prompts: int

    @classmethod
    def of_prompts(
        cls, prompts: Vector, best: npt.NDArray[np.float32], mean: npt.NDArray[np.floating]
    ) -> RelevanceScale:
        """The scale from the unrelated prompts' unit embeddings ``prompts`` [P, D], each one's best score over the
        collection ``best`` [P] and the collection's mean image embedding ``mean`` [D]."""
        if not len(best):
            raise ValueError("no unrelated prompt scored: the collection is empty")
        if prompts.shape != (len(best), len(mean)):
            raise ValueError(f"prompts must be [{len(best)}, {len(mean)}], got {list(prompts.shape)}")
        centre = np.asarray(mean, dtype=np.float32)
        lifts = np.asarray(best, dtype=np.float64) - prompts.astype(np.float64) @ centre.astype(np.float64)
        median = float(np.median(lifts))
        spread = max(MIN_SPREAD, MAD_TO_SIGMA * float(np.median(np.abs(lifts - median))))
        return cls(centre, median, spread, len(best))

    def for_query(self, query: Vector) -> QueryRelevance:
        """The relevance of the scores of ``query``, a unit text embedding [D]."""
        baseline = float(np.dot(query.astype(np.float64), self.mean.astype(np.float64)))
        return QueryRelevance(baseline + self.median, self.spread)


@dataclass(frozen=True)
class SigmoidRelevance:
    """A sigmoid-trained model's relevance (module docstring): ``sigmoid(scale * score + bias)`` with the model's
    ``scale``, ``exp(logit_scale)``, and ``bias``, its ``logit_bias``; the same for every query and collection."""

    kind: ClassVar[RelevanceKind] = "sigmoid"
    default_min_relevance: ClassVar[float] = SIGMOID_MIN_RELEVANCE

    scale: float
    bias: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0.0 and math.isfinite(self.bias)):
            raise ValueError(f"a pair logit needs a finite positive scale and a finite bias, got {self}")

    @classmethod
    def of_model(cls, model: clip_model.ImageTextModel) -> SigmoidRelevance | None:
        """The relevance of ``model``'s pair probability; None for a model not trained with the sigmoid loss (it
        has no logit bias: :func:`clip_model.pair_logit_bias`)."""
        bias = clip_model.pair_logit_bias(model)
        if bias is None:
            return None
        return cls(math.exp(float(model.logit_scale.detach())), float(bias))

    def for_query(self, query: Vector) -> SigmoidRelevance:
        """The relevance of ``query``'s scores: this one (the model's probability does not depend on the query)."""
        return self

    def relevance(self, score: float) -> float:
        """The model's probability that a text and an image with cosine ``score`` match, in [0, 1]."""
        return 0.5 * (1.0 + math.tanh(0.5 * (self.scale * score + self.bias)))  # the sigmoid, without overflow

    def min_score(self, relevance: float) -> float:
        """The score that has ``relevance`` (the inverse, for cut-offs): -inf for 0, +inf for 1."""
        if relevance <= 0.0:
            return -math.inf
        if relevance >= 1.0:
            return math.inf
        return (math.log(relevance / (1.0 - relevance)) - self.bias) / self.scale


GenerationRelevance = RelevanceScale | SigmoidRelevance  # a served generation's scale, one kind per model
ScoreRelevance = QueryRelevance | SigmoidRelevance  # the relevance of one query's scores
