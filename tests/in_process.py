"""The fit and score stages' results computed in one process, without Ray: the reference the
distributed runs are compared with, and a quick ranking for tests that only need one.

Fisher labels come from per-sample seeds, so any number of workers must give these values.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from cluster.batches import iter_row_batches, to_tensors
from cluster.scoring import ScoreSpec, model_and_units, query_part_rows
from cluster.second_hop import hop_spec
from operators.curvature import Curvature, fit_curvature
from operators.factors import DampingConfig
from operators.scores import (
    aggregate,
    grouping_order,
    precondition_queries,
    score_batch,
)
from operators.second_hop import raised


def influence_in_process(spec: ScoreSpec, rows: list[dict], queries: list[dict],
                         fisher: str | None = None, damping: DampingConfig = DampingConfig(),
                         hop: bool = False) -> tuple[Curvature, torch.Tensor]:
    """(the curvature fitted on ``rows``, each row's aggregated score ``[N]``); ``hop``: then
    raised by the second hop, as the score stage does (``influence.expand_top_k``)."""
    model, tok, units = model_and_units(spec)
    batches = [to_tensors(c, tok, spec.tokenize) for c in iter_row_batches(rows, 16)]
    curvature = fit_curvature(model, units, batches, fisher=fisher or spec.influence.fisher,
                              damping=damping, logodds_cap=spec.influence.logodds_cap)
    def query_batches(rows):
        return (to_tensors(c, tok, spec.tokenize) for c in iter_row_batches(rows, 8))

    def scores(spec, queries):
        queries = query_part_rows(spec, queries, tok)  # as scoring
        order = grouping_order(model, units, query_batches(queries), spec.influence)
        queries = queries if order is None else [queries[i] for i in order]
        features = precondition_queries(model, units, query_batches(queries), spec.influence,
                                        curvature)
        return torch.cat([score_batch(model, units, b, features, spec.influence)
                          for b in batches])

    score = aggregate(scores(spec, queries), spec.influence.aggregate)
    return curvature, raised(score, spec.influence.expand_top_k if hop else 0,
                             lambda positions: scores(hop_spec(spec),
                                                      [rows[i] for i in positions]))


def ranked_table(rows: list[dict], score: torch.Tensor) -> pa.Table:
    """``rows`` with ``score`` and ``rank`` (1 = most positive), as the score stage ranks."""
    values = score.numpy()
    rank = np.empty(len(values), dtype=np.int64)
    rank[np.argsort(-values, kind="stable")] = np.arange(1, len(values) + 1)
    table = pa.Table.from_pylist(rows).append_column("score", pa.array(values))
    return table.append_column("rank", pa.array(rank))
