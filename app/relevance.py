"""Relevance: a text query's cosine scores turned into a number in [0, 1] that means the same across models,
collections and queries.

Raw CLIP scores do not: a model's text-image cosines sit in a narrow band of its own (about 0.2-0.35 for
ViT-B/32), so a fixed ``min_score`` keeps junk for one model and drops everything for another. What does carry
over is how a score compares with what a query *unrelated to the collection* reaches over it. So, for each served
generation, the server encodes the unrelated prompts of ``data/unrelated_prompts.txt`` (everyday objects, places,
documents; most have nothing to do with any one collection) and takes each one's best score over the collection.
Their median is where an irrelevant query's best match lands, and 1.4826 x their median absolute deviation the
spread (robust: a prompt that does match the collection, a dog in a pet collection, moves neither much).

    relevance(score) = Phi((score - median) / spread)   (Phi: the standard normal distribution function)

Meaning: relevance 0.5 is what the best match of an unrelated query scores; 0.99 is 2.3 spreads above it, a score
that about one unrelated query in a hundred reaches with its best match. ``DEFAULT_MIN_RELEVANCE`` is the cut-off
the web page applies: results below it look no better than what a query for something absent finds.

It applies to text queries (text search, and combined queries whose parts are all texts): image-to-image scores
live on another scale (a photo's nearest neighbours are usually near-copies), so image queries get none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

MAD_TO_SIGMA = 1.4826  # a normal distribution's standard deviation per median absolute deviation
MIN_SPREAD = 0.005  # a floor on the spread (cosine units), for collections that all queries score alike
DEFAULT_MIN_RELEVANCE = 0.95  # the web page's cut-off
PROMPTS_FILE = "unrelated_prompts.txt"


def unrelated_prompts() -> list[str]:
    """The calibration prompts, in file order (comment and blank lines left out)."""
    text = resources.files("app").joinpath("data", PROMPTS_FILE).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


@dataclass(frozen=True)
class RelevanceScale:
    """One generation's scale (module docstring): the median and spread of unrelated prompts' best scores."""

    median: float
    spread: float
    prompts: int

    @classmethod
    def of_best_scores(cls, best: npt.NDArray[np.float32]) -> RelevanceScale:
        """The scale from the best score [P] of each unrelated prompt over the collection."""
        if not len(best):
            raise ValueError("no unrelated prompt scored: the collection is empty")
        median = float(np.median(best))
        spread = max(MIN_SPREAD, MAD_TO_SIGMA * float(np.median(np.abs(best - median))))
        return cls(median, spread, len(best))

    def relevance(self, score: float) -> float:
        """The relevance of a text query's cosine ``score``, in [0, 1]."""
        return NormalDist(self.median, self.spread).cdf(score)

    def min_score(self, relevance: float) -> float:
        """The score that has ``relevance`` (the inverse, for cut-offs): -inf for 0, +inf for 1."""
        if relevance <= 0.0:
            return -math.inf
        if relevance >= 1.0:
            return math.inf
        return NormalDist(self.median, self.spread).inv_cdf(relevance)
