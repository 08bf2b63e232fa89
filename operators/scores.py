"""Influence scores: batched queries, streamed pairwise scores, aggregation over query batches.

LANCET.md sections 1 and 3. Every method reduces to features and a dot product:

- ``linfac`` / ``ekfac`` / ``kfac``: query feature = IHVP(mean of a query batch's unit gradients),
  train feature = the sample's unit gradients; score = Σ_units ⟨·,·⟩_F.
- ``gradsim``: the same without the IHVP (``similarity="dot"``) or both sides unit-normalised
  over all units (``"cosine"``); ``similarity="cosine"`` on a curvature method normalises the
  preconditioned query and the training gradient alike (normalised influence).
- ``repsim``: cosine of the last-layer hidden state at the last prompt token.

Gradients are of −log p on both sides, so the sign is that of ∇log p_qᵀ H⁻¹ ∇log p_m:
positive = up-weighting the sample raises the likelihood of the undesirable response.

Memory: query gradients stream into their query-batch sums and each unit of a batch is
preconditioned (and, with ``query_rank``, compressed to ``U Vᵀ``) as soon as the batch is full, so
no list of per-query gradients is ever held; training batches are scored one unit at a time.
Everything is computed in float32 (float64 for a float64 model) and returned in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from operators.capture import eval_mode, unit_gradient
from operators.curvature import (
    DEFAULT_FISHER,
    DEFAULT_LOGODDS_CAP,
    FISHER_KINDS,
    Curvature,
    capture_pass,
    check_logodds_cap,
)
from operators.errors import UserError
from operators.factors import DampingConfig
from operators.lowrank import compress, formed_scores, lowrank_scores, token_path_is_cheaper
from operators.methods import InfluenceMethod, get_method
from operators.query_grouping import GROUPINGS, query_sketches, similarity_order
from operators.query_parts import (
    DEFAULT_OPENING,
    DEFAULT_OPENING_OUTSIDE_JUDGED,
    DEFAULT_PARTS,
    OPENING_OUTSIDE_JUDGED,
    check_parts,
)
from operators.second_hop import DEFAULT_EXPAND_TOP_K, check_expand_top_k
from operators.units import Unit, discover_units

AGGREGATES = ("max", "mean")
# Rules measured by `python -m bench.suite` but not (yet) config options: both need whole
# columns (zmax their means, rank their order), which the streamed ranking does not hold.
MEASURED_AGGREGATES = ("zmax", "rank")
SIMILARITIES = ("dot", "cosine")
Features = dict[str, Tensor]
# Low-rank query features are stored as "<unit>#u" [G, o, r] and "<unit>#v" [G, i, r].
LOW_U, LOW_V = "#u", "#v"


@dataclass(frozen=True)
class InfluenceConfig:
    """How scores are computed (the ``influence`` config group)."""

    method: str = "linfac"
    query_batch_size: int = 1
    aggregate: str = "max"
    similarity: str = "dot"  # cosine: both sides unit-normalised (not repsim: always cosine)
    fisher: str = DEFAULT_FISHER  # the curvature's labels: mixed | sampled | empirical
    # every gradient is of −log softmax(z / T): factors, queries and training rows alike
    logodds_cap: float = DEFAULT_LOGODDS_CAP
    damping: DampingConfig = field(default_factory=DampingConfig)
    module_filter: str = ""  # ekfac/kfac/gradsim: only linear modules whose name contains it
    query_rank: int | None = None  # keep each preconditioned query as rank-r factors (None: full)
    query_grouping: str = "similarity"  # which queries share a batch of B (or file order)
    # which tokens of each query a query is taken over, each part a query of its own
    # (operators/query_parts.py): the whole response, the judge's match, the opening tokens
    query_parts: tuple[str, ...] = DEFAULT_PARTS
    opening_tokens: int = DEFAULT_OPENING
    # drop: an opening sharing no token with the judged text is no query (operators/query_parts)
    opening_outside_judged: str = DEFAULT_OPENING_OUTSIDE_JUDGED
    # the top K rows of the first pass become queries of a second (operators/second_hop.py)
    expand_top_k: int = DEFAULT_EXPAND_TOP_K

    def __post_init__(self) -> None:
        get_method(self.method)  # an unknown method fails here, naming the key
        _check("influence.aggregate", self.aggregate, AGGREGATES)
        _check("influence.query_grouping", self.query_grouping, GROUPINGS)
        _check("influence.similarity", self.similarity, SIMILARITIES)
        _check("influence.fisher", self.fisher, FISHER_KINDS)
        _check("influence.opening_outside_judged", self.opening_outside_judged,
               OPENING_OUTSIDE_JUDGED)
        object.__setattr__(self, "logodds_cap", check_logodds_cap(self.logodds_cap))
        object.__setattr__(self, "expand_top_k", check_expand_top_k(self.expand_top_k))
        object.__setattr__(self, "query_parts", check_parts(self.query_parts, self.opening_tokens))
        if int(self.query_batch_size) < 1:
            raise UserError(f"influence.query_batch_size={self.query_batch_size}: must be >= 1")
        if self.query_rank is not None and int(self.query_rank) < 1:
            raise UserError(f"influence.query_rank={self.query_rank}: must be >= 1 (or empty "
                             "for full rank)")

    @property
    def kind(self) -> InfluenceMethod:
        """The method's entry in the registry (operators/methods.py)."""
        return get_method(self.method)

    @property
    def uses_curvature(self) -> bool:
        return self.kind.curvature


def units_for(model: nn.Module, config: InfluenceConfig) -> list[Unit]:
    """The units ``config``'s method takes gradients over (none for a representation method)."""
    if config.kind.units is None:
        return []
    return discover_units(model, config.method, config.module_filter)


def _check(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r}: expected one of {allowed}")


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


def row_features(model: nn.Module, units: list[Unit], batch: dict[str, Tensor],
                 config: InfluenceConfig) -> Iterator[tuple[str, Tensor]]:
    """Per-row features of a batch, one unit at a time: ``(name, [B, o, i])``.

    One forward + backward captures every unit; each unit's gradient is formed only when the
    caller asks for it, so a single unit's ``[B, o, i]`` exists at a time. ``repsim`` yields
    the representation ``("repr", [B, d])``.
    """
    if config.kind.units is None:
        yield "repr", last_prompt_hidden(model, batch).double()
        return
    cap = capture_pass(model, units, batch, sampled=False, logodds_cap=config.logodds_cap)
    for unit in units:
        yield unit.name, unit_gradient(cap, unit, batch["attention_mask"])


def _is_cosine(config: InfluenceConfig) -> bool:
    return config.kind.is_cosine(config.similarity)


class QueryGroups:
    """Streams query rows into their query-batch means (LANCET.md section 3).

    Query ``q`` belongs to batch ``q // B``. Each unit of a batch is averaged, preconditioned
    and compressed as soon as the batch's last row has been seen; only a batch that straddles
    two loader batches keeps a raw sum across them.
    """

    def __init__(self, config: InfluenceConfig, curvature: Curvature | None) -> None:
        if config.uses_curvature and curvature is None:
            raise UserError(f"influence.method={config.method} needs fitted factors")
        self.config, self.curvature = config, curvature
        self.rows = 0
        self.counts: dict[int, int] = {}
        self.pending: dict[int, dict[str, Tensor]] = {}
        self.done: dict[int, dict[str, Tensor]] = {}
        self.squares: dict[int, Tensor] = {}

    def add(self, model: nn.Module, units: list[Unit], batch: dict[str, Tensor]) -> None:
        n = int(batch["input_ids"].shape[0])
        owner = [(self.rows + r) // self.config.query_batch_size for r in range(n)]
        self.rows += n
        members = {g: [r for r in range(n) if owner[r] == g] for g in dict.fromkeys(owner)}
        for group, rows in members.items():
            self.counts[group] = self.counts.get(group, 0) + len(rows)
        for name, feats in row_features(model, units, batch, self.config):
            for group, rows in members.items():
                self._add(group, name, feats[rows].sum(dim=0))

    def _add(self, group: int, name: str, part: Tensor) -> None:
        sums = self.pending.setdefault(group, {})
        sums[name] = part if name not in sums else sums[name] + part
        if self.counts[group] == self.config.query_batch_size:
            self._finish(group, name)

    def _finish(self, group: int, name: str) -> None:
        mean = self.pending[group].pop(name) / self.counts[group]
        if self.curvature is not None:
            mean = self.curvature.ihvp({name: mean})[name]
        if _is_cosine(self.config):
            self.squares[group] = self.squares.get(group, 0.0) + mean.double().pow(2).sum()
        out = self.done.setdefault(group, {})
        rank = self.config.query_rank
        if rank is None or mean.dim() != 2:
            out[name] = mean
        else:
            out[name + LOW_U], out[name + LOW_V] = compress(mean, int(rank))

    def result(self) -> Features:
        """Features of every query batch, stacked in query order: name -> ``[G, ...]``."""
        for group, sums in list(self.pending.items()):
            for name in list(sums):
                self._finish(group, name)
        if not self.done:
            raise UserError("no influence queries to precondition")
        groups = sorted(self.done)
        if _is_cosine(self.config):
            for group in groups:
                _scale(self.done[group], self.squares[group].sqrt().clamp_min(1e-30))
        return {name: _stack([self.done[g][name] for g in groups])
                for name in self.done[groups[0]]}


def _scale(features: dict[str, Tensor], norm: Tensor) -> None:
    for name in features:
        if not name.endswith(LOW_V):  # a low-rank query U Vᵀ is scaled through U alone
            features[name] = features[name] / norm.to(features[name].dtype)


def _stack(parts: list[Tensor]) -> Tensor:
    """Stack per-group factors; low-rank factors of lower rank are zero-padded to the widest."""
    width = max(p.shape[-1] for p in parts)
    if parts[0].dim() == 2 and any(p.shape[-1] != width for p in parts):
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in parts]
    return torch.stack(parts)


def grouping_order(model: nn.Module, units: list[Unit], batches: Iterable[dict],
                   config: InfluenceConfig) -> list[int] | None:
    """The order to stream the queries in so that each run of B is one batch, or None for file
    order (``query_grouping=order``, or B = 1). ``batches``: the queries in file order.

    Gradient methods compare sketches of the query gradients (operators/query_grouping.py);
    ``repsim`` compares its representations.
    """
    if config.query_grouping == "order" or config.query_batch_size <= 1:
        return None
    if config.kind.units is None:
        sketches = torch.cat([last_prompt_hidden(model, b).double().cpu() for b in batches])
    else:
        sketches = query_sketches(model, units, batches, logodds_cap=config.logodds_cap)
    return similarity_order(sketches, config.query_batch_size)


def precondition_queries(model: nn.Module, units: list[Unit], batches: Iterable[dict],
                         config: InfluenceConfig, curvature: Curvature | None) -> Features:
    """Query features, one row per query batch of size B: name -> ``[num_batches, ...]``.

    A batch's raw features are averaged, then preconditioned once (one IHVP per batch).
    """
    groups = QueryGroups(config, curvature)
    for batch in batches:
        groups.add(model, units, batch)
    return groups.result()


def score_batch(model: nn.Module, units: list[Unit], batch: dict[str, Tensor],
                queries: Features, config: InfluenceConfig) -> Tensor:
    """Raw scores of one training batch: ``[B, num_query_batches]`` (float64).

    Σ_units ⟨query feature, DŴ⟩, one unit at a time; against low-rank queries a unit is scored
    from its token vectors when that is cheaper than forming its gradient.
    """
    if config.kind.units is None:
        feats = last_prompt_hidden(model, batch).double()
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return feats @ queries["repr"].double().T
    total, squares = None, None
    for part, sq in _unit_parts(model, units, batch, queries, config):
        total = part if total is None else total + part
        if sq is not None:
            squares = sq if squares is None else squares + sq
    if _is_cosine(config):
        total = total / squares.sqrt().clamp_min(1e-30).unsqueeze(1)
    return total


def unit_scores(model: nn.Module, units: list[Unit], batch: dict[str, Tensor],
                queries: Features, config: InfluenceConfig) -> Tensor:
    """Each unit's term of ``score_batch``: ``[B, num_query_batches, U]`` (float64, ``units``
    order), for the per-sublayer attribution (operators/attribution.py).

    Summed over the last axis in unit order it is ``score_batch``'s result bit for bit (the
    same terms added in the same order); with cosine similarity every term is divided by the
    row's norm over all units, so the sum equals it up to rounding.
    """
    if config.kind.units is None:
        raise UserError(f"influence.method={config.method} takes no gradients: its score has "
                        "no per-unit terms")
    parts, squares = [], None
    for part, sq in _unit_parts(model, units, batch, queries, config):
        parts.append(part)
        if sq is not None:
            squares = sq if squares is None else squares + sq
    out = torch.stack(parts, dim=-1)
    if _is_cosine(config):
        out = out / squares.sqrt().clamp_min(1e-30)[:, None, None]
    return out


def _unit_parts(model: nn.Module, units: list[Unit], batch: dict[str, Tensor],
                queries: Features, config: InfluenceConfig
                ) -> Iterator[tuple[Tensor, Tensor | None]]:
    """One forward + backward, then per unit: its ``[B, G]`` scores (float64) and, for cosine,
    the squared norms ``[B]`` of its DŴ. The one loop behind ``score_batch`` and
    ``unit_scores``, so the two cannot drift apart."""
    cap = capture_pass(model, units, batch, sampled=False, logodds_cap=config.logodds_cap)
    mask = batch["attention_mask"]
    for unit in units:
        part, sq = _unit_scores(cap, unit, mask, queries, _is_cosine(config))
        yield part.double(), sq


def _unit_scores(cap, unit: Unit, mask: Tensor, queries: Features, cosine: bool
                 ) -> tuple[Tensor, Tensor | None]:
    """One unit's ``[B, G]`` scores and, for cosine, the squared norms ``[B]`` of its DŴ."""
    if unit.name + LOW_U in queries:
        u, v = queries[unit.name + LOW_U], queries[unit.name + LOW_V]
        tokens = int(mask.shape[1])
        if not cosine and token_path_is_cheaper(tokens, *unit.shape, u.shape[0], u.shape[-1]):
            return lowrank_scores(cap.output_grad(unit, mask), cap.kappa(unit, mask), u, v), None
        grads = unit_gradient(cap, unit, mask)
        return formed_scores(grads, u, v), grads.double().pow(2).flatten(1).sum(1)
    grads = unit_gradient(cap, unit, mask)
    q = queries[unit.name]
    scores = grads.flatten(1) @ q.flatten(1).to(grads.dtype).T
    return scores, grads.double().pow(2).flatten(1).sum(1) if cosine else None


def column_scales(raw: Tensor) -> Tensor:
    """Each column's unbiased standard deviation over the finite rows; 1 where it is 0 or
    undefined (fewer than two finite rows)."""
    finite = raw[torch.isfinite(raw).all(dim=1)]
    if finite.shape[0] < 2:
        return torch.ones(raw.shape[1], dtype=raw.dtype)
    std = finite.std(dim=0)
    return torch.where(std > 0, std, torch.ones_like(std))


def aggregate(raw: Tensor, how: str = "max", scales: Tensor | None = None) -> Tensor:
    """Combine per-query-batch scores ``[N, Q]`` into one score per sample ``[N]``; NaN for a
    row with a non-finite score.

    Each column is scaled to unit standard deviation over the corpus so no batch dominates
    (``scales``: the columns' scales when ``raw`` is one chunk of the corpus, else computed
    from ``raw``). Columns are not centred: a score's sign (drives vs inhibits) is kept.
    This is the one definition: the pipeline's streamed ranking calls it chunk by chunk.

    ``how`` may also be one of ``MEASURED_AGGREGATES`` (whole columns only, ``scales`` unused):
    ``zmax`` = max over centred, standardised columns; ``rank`` = mean over columns of each
    row's rank in its column, scaled to (0, 1] (1 = the column's top score).
    """
    _check("influence.aggregate", how, AGGREGATES + MEASURED_AGGREGATES)
    finite = torch.isfinite(raw).all(dim=1)
    if how in MEASURED_AGGREGATES:
        score = _zmax(raw, finite) if how == "zmax" else _mean_rank(raw, finite)
        return score.masked_fill(~finite, math.nan)
    scaled = raw / (column_scales(raw) if scales is None else scales)
    score = scaled.max(dim=1).values if how == "max" else scaled.mean(dim=1)
    return score.masked_fill(~finite, math.nan)


def inhibition(raw: Tensor, how: str = "max", scales: Tensor | None = None) -> Tensor:
    """How strongly each sample inhibits an observed output ``[N]`` (negative: it does; NaN
    as ``aggregate``): under ``max`` the most negative scaled column, the dual of the score
    (a sample that lowers the likelihood of any observed bad output), under ``mean`` the mean
    score itself. The negative influence set is built on it (operators/selection.py)."""
    if how != "max":
        return aggregate(raw, how, scales)
    finite = torch.isfinite(raw).all(dim=1)
    scaled = raw / (column_scales(raw) if scales is None else scales)
    return scaled.min(dim=1).values.masked_fill(~finite, math.nan)


def _zmax(raw: Tensor, finite: Tensor) -> Tensor:
    """Max over columns of (raw − column mean) / column std, statistics over finite rows."""
    rows = raw[finite]
    mean = rows.mean(dim=0) if rows.shape[0] else torch.zeros(raw.shape[1], dtype=raw.dtype)
    return ((raw - mean) / column_scales(raw)).max(dim=1).values


def _mean_rank(raw: Tensor, finite: Tensor) -> Tensor:
    """Mean over columns of each finite row's rank among the finite rows, ÷ their count."""
    out = torch.full((raw.shape[0],), math.nan, dtype=torch.float64)
    rows = raw[finite].double()
    if rows.shape[0]:
        ranks = rows.argsort(dim=0).argsort(dim=0).double() + 1  # 1 = lowest score
        out[finite] = ranks.mean(dim=1) / rows.shape[0]
    return out
