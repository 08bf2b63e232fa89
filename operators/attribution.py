"""Per-sublayer attribution: how much of a sample's score each unit carries (issue #17).

LinFAC's score is a sum over units (LANCET.md section 2: I = Σ_units ⟨IHVP(DŴ_q), DŴ_m⟩), and
the aggregation over query batches (section 3) is linear in the scaled columns once the column
that wins the max is known. So a row's final score splits exactly into one term per unit u,
from its per-unit raw scores ``P[g, u]`` and the column scales ``σ_g`` (``aggregate``'s):

    max:   c_u = P[g*, u] / σ_g*     g* = argmax_g Σ_u P[g, u] / σ_g  (the first on a tie)
    mean:  c_u = mean_g P[g, u] / σ_g
    share_u = c_u / Σ_u c_u          (Σ_u share_u = 1; Σ_u c_u is the row's score)

A share is signed: on a positive score a unit with a negative share pulled against it; on a
negative score (an inhibiting sample) a positive share pushed it further negative. When the
units cancel (|Σ c_u| below ``cancel`` times Σ |c_u|) or a term is not finite, a share means
nothing and the row's shares are NaN.
"""

from __future__ import annotations

from functools import reduce

import torch
from torch import Tensor

from operators.errors import UserError
from operators.scores import AGGREGATES, column_scales
from operators.units import sublayer_of

CANCEL = 1e-6  # |total| below this share of the units' absolute sum: the units cancel


def unit_total(per_unit: Tensor) -> Tensor:
    """``[N, G, U]`` → ``[N, G]``: the units summed in unit order, as ``score_batch`` adds
    them (so the totals equal its raw scores bit for bit)."""
    return reduce(torch.add, per_unit.unbind(-1))


def contributions(per_unit: Tensor, how: str = "max", scales: Tensor | None = None) -> Tensor:
    """Each unit's term of the aggregated score: ``[N, G, U]`` → ``[N, U]`` (float64).

    ``scales``: the columns' scales over the whole corpus (``column_scales`` of the raw scores,
    ``[G]``), else computed from ``per_unit``'s own totals. Summed over units, a row is
    ``aggregate(unit_total(per_unit), how, scales)`` up to rounding; a row with a non-finite
    term is NaN throughout.
    """
    if how not in AGGREGATES:
        raise UserError(f"influence.aggregate={how!r}: expected one of {AGGREGATES}")
    per_unit = per_unit.double()
    total = unit_total(per_unit)
    scales = column_scales(total) if scales is None else scales.double()
    scaled = per_unit / scales[None, :, None]
    if how == "max":
        winner = (total / scales).argmax(dim=1)
        out = scaled[torch.arange(per_unit.shape[0]), winner]
    else:
        out = scaled.mean(dim=1)
    finite = torch.isfinite(per_unit).flatten(1).all(dim=1)
    return out.masked_fill(~finite[:, None], float("nan"))


def unit_shares(terms: Tensor, cancel: float = CANCEL) -> Tensor:
    """Each unit's share of its row's score: ``[N, U]`` terms → ``[N, U]`` shares summing to 1
    per row; NaN for a row whose units cancel or whose terms are not finite (module doc)."""
    total = terms.sum(dim=1, keepdim=True)
    defined = (total.abs() > cancel * terms.abs().sum(dim=1, keepdim=True)) & torch.isfinite(total)
    return torch.where(defined, terms / total, torch.full_like(terms, float("nan")))


def sublayer_groups(names: list[str]) -> list[tuple[int, str]]:
    """The ``(layer, part)`` groups of ``names`` (``sublayer_of``), in layer order, attention
    before MLP, then any other part by name."""
    order = {"attn": 0, "mlp": 1}
    found = {sublayer_of(n) for n in names}
    return sorted(found, key=lambda g: (g[0], order.get(g[1], 2), g[1]))


def group_shares(shares: Tensor, names: list[str]) -> tuple[list[tuple[int, str]], Tensor]:
    """Shares of units summed into their sublayer groups: ``[N, U]`` → ``[N, len(groups)]``.

    For LinFAC a group is one unit; for EK-FAC/K-FAC/GradSim the linear modules of one
    attention or MLP sublayer add up to it.
    """
    groups = sublayer_groups(names)
    index = {g: i for i, g in enumerate(groups)}
    member = torch.zeros(len(names), len(groups), dtype=shares.dtype)
    for u, name in enumerate(names):
        member[u, index[sublayer_of(name)]] = 1.0
    return groups, shares @ member


def mean_group_shares(shares: Tensor, names: list[str]) -> dict[tuple[int, str], float]:
    """Each sublayer group's mean share over the rows whose shares are defined (NaN when none
    is)."""
    groups, grouped = group_shares(shares, names)
    rows = grouped[torch.isfinite(grouped).all(dim=1)]
    means = rows.mean(dim=0) if rows.shape[0] else torch.full((len(groups),), float("nan"))
    return {g: float(m) for g, m in zip(groups, means)}
