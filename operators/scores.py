"""Influence scores: batched queries, streamed pairwise scores, aggregation over query batches.

LANCET.md sections 1 and 3. Every method reduces to features and a dot product:

- ``linfac`` / ``ekfac`` / ``kfac``: query feature = IHVP(mean of a query batch's unit gradients),
  train feature = the sample's unit gradients; score = Σ_units ⟨·,·⟩_F.
- ``gradsim``: the same without the IHVP (``similarity="dot"``) or both sides unit-normalised
  over all units (``"cosine"``).
- ``repsim``: cosine of the last-layer hidden state at the last prompt token.

Gradients are of −log p on both sides, so the sign is that of ∇log p_qᵀ H⁻¹ ∇log p_m:
positive = up-weighting the sample raises the likelihood of the undesirable response.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from operators.capture import eval_mode
from operators.curvature import Curvature, batch_gradients
from operators.factors import DampingConfig
from operators.units import Unit

METHODS = ("linfac", "ekfac", "kfac", "gradsim", "repsim")
AGGREGATES = ("max", "mean")
SIMILARITIES = ("dot", "cosine")
Features = dict[str, Tensor]


@dataclass(frozen=True)
class InfluenceConfig:
    """How scores are computed (the ``influence`` config group)."""

    method: str = "linfac"
    query_batch_size: int = 1
    aggregate: str = "max"
    similarity: str = "dot"  # gradsim only
    fisher: str = "sampled"
    damping: DampingConfig = field(default_factory=DampingConfig)
    module_filter: str = ""  # ekfac/kfac/gradsim: only linear modules whose name contains it

    def __post_init__(self) -> None:
        _check("influence.method", self.method, METHODS)
        _check("influence.aggregate", self.aggregate, AGGREGATES)
        _check("influence.similarity", self.similarity, SIMILARITIES)
        _check("influence.fisher", self.fisher, ("sampled", "empirical"))
        if int(self.query_batch_size) < 1:
            raise ValueError(f"influence.query_batch_size={self.query_batch_size}: must be >= 1")

    @property
    def uses_curvature(self) -> bool:
        return self.method in ("linfac", "ekfac", "kfac")

    @property
    def unit_method(self) -> str:
        """Which units the gradients are taken over (gradsim uses the linear modules)."""
        return "ekfac" if self.method in ("gradsim", "kfac") else self.method


def _check(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r}: expected one of {allowed}")


def query_batches(n_queries: int, batch_size: int) -> list[list[int]]:
    """Consecutive groups of query indices; the last may be smaller."""
    return [list(range(i, min(i + batch_size, n_queries)))
            for i in range(0, n_queries, batch_size)]


def last_prompt_hidden(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Last-layer hidden state at each sample's last prompt token: ``[B, d]``."""
    with eval_mode(model), torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True)
    hidden = out.hidden_states[-1]
    return hidden[torch.arange(hidden.shape[0]), batch["prompt_last"]]


def sample_features(model: nn.Module, units: list[Unit], batch: dict[str, Tensor],
                    config: InfluenceConfig) -> Features:
    """Raw per-sample features of a batch: unit gradients, or the representation for repsim."""
    if config.method == "repsim":
        return {"repr": last_prompt_hidden(model, batch).double()}
    return batch_gradients(model, units, batch)


def _normalise(features: Features) -> Features:
    sq = sum(f.flatten(1).pow(2).sum(dim=1) for f in features.values())
    norm = sq.sqrt().clamp_min(1e-30)
    return {k: f / norm.view(-1, *([1] * (f.dim() - 1))) for k, f in features.items()}


def _is_cosine(config: InfluenceConfig) -> bool:
    return config.method == "repsim" or (config.method == "gradsim"
                                         and config.similarity == "cosine")


def precondition_queries(model: nn.Module, units: list[Unit], batches: Iterable[dict],
                         config: InfluenceConfig, curvature: Curvature | None) -> Features:
    """Query features, one row per query batch of size B: name -> ``[num_batches, ...]``.

    A batch's raw features are averaged, then preconditioned once (one IHVP per batch).
    """
    raw: dict[str, list[Tensor]] = {}
    for batch in batches:
        feats = sample_features(model, units, batch, config)
        for name, value in feats.items():
            raw.setdefault(name, []).append(value)
    per_query = {name: torch.cat(parts) for name, parts in raw.items()}
    n = next(iter(per_query.values())).shape[0]
    groups = query_batches(n, config.query_batch_size)
    means = {name: torch.stack([v[idx].mean(dim=0) for idx in groups])
             for name, v in per_query.items()}
    if config.uses_curvature:
        if curvature is None:
            raise ValueError(f"influence.method={config.method} needs fitted factors")
        return curvature.ihvp(means)
    return _normalise(means) if _is_cosine(config) else means


def pairwise_scores(train: Features, queries: Features, config: InfluenceConfig) -> Tensor:
    """Scores of a training batch against every query batch: ``[B, num_query_batches]``."""
    if _is_cosine(config):
        train = _normalise(train)
    total = None
    for name, q in queries.items():
        t = train[name].to(q.dtype)
        part = t.flatten(1) @ q.flatten(1).T
        total = part if total is None else total + part
    return total


def score_batch(model: nn.Module, units: list[Unit], batch: dict[str, Tensor],
                queries: Features, config: InfluenceConfig) -> Tensor:
    """Raw scores of one training batch: ``[B, num_query_batches]`` (float64)."""
    return pairwise_scores(sample_features(model, units, batch, config), queries, config).double()


def aggregate(raw: Tensor, how: str = "max") -> Tensor:
    """Combine per-query-batch scores ``[N, Q]`` into one score per sample ``[N]``.

    Each column is scaled to unit standard deviation over the corpus so no batch dominates.
    Columns are not centred: a score's sign (drives vs inhibits) is kept.
    """
    _check("influence.aggregate", how, AGGREGATES)
    if raw.shape[0] > 1:
        scale = raw.std(dim=0, keepdim=True)
        scaled = raw / torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        scaled = raw
    return scaled.max(dim=1).values if how == "max" else scaled.mean(dim=1)


def nonfinite_rows(raw: Tensor) -> Tensor:
    """Indices of samples whose scores are NaN or infinite (reported, never aggregated)."""
    return (~torch.isfinite(raw)).any(dim=1).nonzero().flatten()
