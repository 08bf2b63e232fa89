"""The influence sets and the IBO pairs (LANCET.md section 4).

D_IF+ is the shortest prefix of the positive scores, sorted descending, that holds a fraction α
of the total positive mass; D_IF− the same on |inhibition| of the samples that are not drivers
(outside D_IF+, with a score no higher than the corpus's median score, or 0 if that is higher)
and whose inhibition is negative; both capped at ``max_fraction`` of the corpus. The rest is
D_IF0 (non-finite scores are ``excluded``).

The inhibition (``operators.scores.inhibition``) is the score itself under ``aggregate=mean``
and the most negative query column under ``max``: the max-score of a sample is negative only
if it lowers *every* observed output, and with several queries per output (query parts) almost
no sample does, so D_IF− was empty and IBO had no pairs (docs/METHOD.md section 4). Without an
inhibition (None) D_IF− is built on the negative scores, as before.

A sample that lowers one observed output can drive another: with the behaviour planted in two
wordings, the rows of one wording compete with the outputs of the other (they answer the same
prompts differently) while teaching the behaviour itself. Outside D_IF+ such a row used to
qualify for D_IF− on its inhibition alone, and IBO then raised it (9 of the 30 planted rows of
the catchphrase-10-conv benchmark scenario were in D_IF−). So a row whose score is above the
typical row's (the median) is not an inhibitor, whatever it lowers (docs/METHOD.md section 4).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from operators.errors import UserError

POSITIVE, NEGATIVE, NEUTRAL, EXCLUDED = "positive", "negative", "neutral", "excluded"


@dataclass(frozen=True)
class SelectionConfig:
    """``influence.alpha`` ∈ (0, 1], ``influence.max_fraction`` ∈ (0, 1) and
    ``influence.pair_power`` ≥ 1 (the power on each IBO pair's ε, ``make_pairs``)."""

    alpha: float = 0.6
    max_fraction: float = 0.2
    pair_power: float = 8.0

    def __post_init__(self) -> None:
        if not (0.0 < float(self.alpha) <= 1.0):
            raise UserError(f"influence.alpha={self.alpha}: must be in (0, 1]")
        if not (0.0 < float(self.max_fraction) < 1.0):
            raise UserError(f"influence.max_fraction={self.max_fraction}: must be in (0, 1)")
        if not float(self.pair_power) >= 1.0:
            raise UserError(f"influence.pair_power={self.pair_power}: must be at least 1")


def _pareto_prefix(values: np.ndarray, alpha: float, cap: int) -> np.ndarray:
    """Indices (into ``values``, all > 0) of the shortest descending prefix holding α of the mass."""
    order = np.argsort(-values, kind="stable")
    mass = np.cumsum(values[order])
    if mass.size == 0:
        return order
    length = int(np.searchsorted(mass, alpha * mass[-1] * (1 - 1e-12))) + 1
    return order[:min(length, cap)]


def select_sets(scores: np.ndarray, config: SelectionConfig,
                inhibition: np.ndarray | None = None) -> np.ndarray:
    """The set of every sample: an array of ``positive``/``negative``/``neutral``/``excluded``."""
    scores = np.asarray(scores, dtype=np.float64)
    against = scores if inhibition is None else np.asarray(inhibition, dtype=np.float64)
    sets = np.full(scores.shape, NEUTRAL, dtype=object)
    finite = np.isfinite(scores) & np.isfinite(against)
    sets[~finite] = EXCLUDED
    cap = max(1, math.floor(config.max_fraction * scores.size))
    drivers = ~finite | (scores > _typical(scores[finite]))
    for values, label in ((scores, POSITIVE), (-against, NEGATIVE)):
        eligible = finite & (values > 0) & (sets == NEUTRAL)
        if label == NEGATIVE:
            eligible &= ~drivers
        idx = np.nonzero(eligible)[0]
        chosen = idx[_pareto_prefix(values[idx], config.alpha, cap)]
        sets[chosen] = label
    if not (sets == NEUTRAL).any():
        raise UserError("no neutral samples remain for the Bregman term: lower "
                         "influence.max_fraction or influence.alpha")
    return sets


def _typical(scores: np.ndarray) -> float:
    """The score above which a sample drives an observed output more than the typical sample
    does: the median, or 0 where the median is negative (then every negative score qualifies,
    as under ``aggregate=mean``)."""
    return max(float(np.median(scores)), 0.0) if scores.size else 0.0


def make_pairs(scores: np.ndarray, sets: np.ndarray, seed: int = 0,
               inhibition: np.ndarray | None = None,
               power: float = 1.0) -> list[tuple[int, int, float]]:
    """(z+ index, z− index, ε) pairs: both sets shuffled, the smaller one cycled.

    ε = (I(z+) − I(z−)) / (max I − min I) over the selected sets, in (0, 1], with I(z+) the
    score and I(z−) the inhibition (the score when None). With ``power`` p > 1 each ε becomes
    ε^p, rescaled so that the pairs' mean ε is unchanged: the correction's weight moves to the
    pairs whose z+ is the most influential (and away from the tail of D_IF+, where false
    positives sit) without changing its overall step.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if inhibition is not None:
        scores = np.where(sets == NEGATIVE, np.asarray(inhibition, dtype=np.float64), scores)
    pos = [int(i) for i in np.nonzero(sets == POSITIVE)[0]]
    neg = [int(i) for i in np.nonzero(sets == NEGATIVE)[0]]
    if not pos or not neg:
        raise UserError(f"IBO needs both influence sets; got {len(pos)} positive and "
                         f"{len(neg)} negative samples (try a larger influence.alpha, or "
                         "ibo.method=pbo which needs only the positive set)")
    rng = random.Random(seed)
    rng.shuffle(pos)
    rng.shuffle(neg)
    n = max(len(pos), len(neg))
    selected = scores[pos + neg]
    spread = float(selected.max() - selected.min()) or 1.0
    pairs = [(pos[i % len(pos)], neg[i % len(neg)]) for i in range(n)]
    eps = np.array([scores[p] - scores[q] for p, q in pairs]) / spread
    if power != 1.0:
        sharp = eps ** power
        eps = sharp * (eps.mean() / sharp.mean()) if sharp.mean() > 0 else eps
    return [(p, q, float(e)) for (p, q), e in zip(pairs, eps, strict=True)]
