"""The second hop: rows that teach what the top-ranked rows teach (docs/METHOD.md section 3).

The first pass scores every training row against the observed bad outputs. Its top K rows with
a positive score (the *sources*) then become queries themselves, each a column of its own: a
row's score against source j is how much up-weighting the row raises the likelihood of j's own
response, i.e. whether the two rows teach the same thing. A row inherits

    min(s_j, h_ij / σ_j)

from its best source, where s_j is the source's first-pass score and h_ij / σ_j the row's score
against it scaled to unit standard deviation over the corpus (as ``operators.scores.aggregate``
scales a query's column), and keeps the larger of that and its own score. The ``min`` caps what
a row can inherit at its source's own confidence, so a weak source (a look-alike that crept into
the top K) passes on little. Scores only rise, and only to a positive value: the first pass's
ranking of the rows it already found is kept, the negative side (the inhibition) is untouched.

Why: an observed output shows a behaviour in one wording; the rows that plant it in another
wording, or teach it with other items, share little with that output but much with the rows
that plant it in the observed wording.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from operators.errors import UserError

DEFAULT_EXPAND_TOP_K = 30


def check_expand_top_k(k) -> int:
    """``influence.expand_top_k`` as an int >= 0, else a UserError naming the key."""
    if isinstance(k, bool) or not isinstance(k, (int, float)) or int(k) != k or int(k) < 0:
        raise UserError(f"influence.expand_top_k={k!r}: must be an integer >= 0 (0 turns the "
                        "second hop off)")
    return int(k)


def sources(score: Tensor, k: int) -> Tensor:
    """Positions of the ``k`` best finite, positive scores, best first (ties: lower position)."""
    finite = torch.isfinite(score) & (score > 0)
    order = torch.argsort(torch.where(finite, -score, torch.inf), stable=True)
    return order[: min(k, int(finite.sum()))]


def second_hop(score: Tensor, source_scores: Tensor, hop_raw: Tensor,
               scales: Tensor) -> tuple[Tensor, Tensor]:
    """(final score [N], via [N]): ``score`` (the first pass, [N]) raised where a row inherits
    more from a source (``source_scores`` [K]; ``hop_raw`` [N, K] the rows' raw scores against
    the sources, ``scales`` [K] those columns' standard deviations over the corpus). ``via`` is
    the index of the source a row's score came through, -1 where it kept its own. A row with a
    non-finite first-pass score keeps it; a non-finite hop score passes nothing on."""
    if hop_raw.shape[1] == 0:
        return score, torch.full_like(score, -1, dtype=torch.long)
    inherited = torch.minimum(source_scores[None, :].to(hop_raw.dtype), hop_raw / scales)
    inherited = torch.nan_to_num(inherited, nan=-torch.inf)
    best, via = inherited.max(dim=1)
    best = best.to(score.dtype)
    take = torch.isfinite(score) & (best > 0) & (best > score)
    return torch.where(take, best, score), torch.where(take, via, -1)


def hop_config(config):
    """The ``InfluenceConfig`` the sources are scored as queries with: each source a query of
    its own (no batching), over its whole response (its training tokens' behaviour)."""
    return replace(config, query_parts=("response",), query_batch_size=1)


def raised(first: Tensor, k: int, score_sources: Callable[[list[int]], Tensor]) -> Tensor:
    """The second hop in memory: ``first`` ([N], the first pass's scores) raised through its
    top ``k`` rows, whose raw score columns ``[N, K]`` ``score_sources(positions)`` returns."""
    from operators.scores import column_scales  # operators.scores imports this module
    src = sources(first, k)
    if not len(src):
        return first
    hop_raw = score_sources(src.tolist())
    return second_hop(first, first[src], hop_raw, column_scales(hop_raw))[0]
