"""Evaluation metrics (LANCET.md section 6): recall quality, rank correlation, utility, diversity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def auprc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the precision-recall curve (average precision) of ranking by ``scores``.

    Ties are broken pessimistically (positives after negatives of equal score), so a constant
    scorer earns the base rate and nothing more. NaN when there is no positive label.
    """
    pairs = sorted(zip(scores, labels), key=lambda p: (-p[0], p[1]))
    positives = sum(bool(label) for _, label in pairs)
    if positives == 0:
        return float("nan")
    hits, total = 0, 0.0
    for rank, (_, label) in enumerate(pairs, start=1):
        if label:
            hits += 1
            total += hits / rank
    return total / positives


def precision_recall_curve(scores: Sequence[float], labels: Sequence[bool]
                           ) -> tuple[list[float], list[float]]:
    """Precision and recall at every cut-off of the ranking (for plotting)."""
    pairs = sorted(zip(scores, labels), key=lambda p: (-p[0], p[1]))
    positives = max(sum(bool(label) for _, label in pairs), 1)
    precision, recall, hits = [], [], 0
    for rank, (_, label) in enumerate(pairs, start=1):
        hits += bool(label)
        precision.append(hits / rank)
        recall.append(hits / positives)
    return precision, recall


def recall_at_k(scores: Sequence[float], labels: Sequence[bool], k: int | None = None) -> float:
    """Share of the positives found in the top ``k`` (default: k = number of positives)."""
    positives = sum(bool(label) for label in labels)
    if positives == 0:
        return float("nan")
    k = positives if k is None else k
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], bool(labels[i])))
    return sum(bool(labels[i]) for i in order[:k]) / positives


def _ranks(values: Tensor) -> Tensor:
    """Average ranks (ties share their mean rank), 0-based."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    for value in torch.unique(values):
        tie = values == value
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float] | Tensor, y: Sequence[float] | Tensor) -> float:
    """Spearman rank correlation of two equal-length sequences."""
    rx = _ranks(torch.as_tensor(x, dtype=torch.float64))
    ry = _ranks(torch.as_tensor(y, dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(rx.norm() * ry.norm())
    return float(rx @ ry) / denominator if denominator > 0 else float("nan")


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(Σ −log p / number of tokens)."""
    return math.exp(total_nll / max(total_tokens, 1))


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n: unique n-grams ÷ all n-grams over a set of generations (whitespace tokens)."""
    grams: list[tuple[str, ...]] = []
    for text in texts:
        words = text.split()
        grams.extend(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return len(set(grams)) / len(grams) if grams else 0.0
