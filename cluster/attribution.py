"""Per-sublayer attribution of the top-ranked rows, written as a column of the ranked shards.

The raw shards hold one score per query batch (``[G]`` a row); keeping every unit's term there
would grow them U-fold for rows nobody looks at. So after ranking, only the
``influence.attribution_top_k`` best rows are re-scored per unit (``operators.scores.
unit_scores``), once, as one Ray task with one worker's resources, against the same
preconditioned queries and column scales as the ranking. Their shares of the score
(``operators.attribution``) become the ``unit_shares`` column: ``list<float32>``, one value per
unit, null for the other rows; the unit names are in the column's field metadata
(``lancet.units``, a JSON list), which Parquet keeps through the select stage's ``scores/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cluster.batches import text_columns, to_tensors
from cluster.runtime import ClusterConfig, device_for, pin_threads
from cluster.scoring import BATCH_ROWS, Ranking, RowColumn, ScoreSpec, model_and_units
from operators.attribution import contributions, unit_shares
from operators.scores import unit_scores

COLUMN = "unit_shares"
UNITS_KEY = b"lancet.units"
# (rows, column scales) -> (unit names, per-unit terms [rows, U]): in process or a Ray task
Rescore = Callable[[pa.Table, np.ndarray], tuple[list[str], np.ndarray]]


def read_positions(raw_dir: Path, positions: np.ndarray) -> pa.Table:
    """The text columns of the rows at ``positions`` (ascending, the raw shards' row order),
    streamed: one record batch at a time, keeping only the wanted rows."""
    files = sorted(raw_dir.glob("*.parquet"))
    columns = text_columns(pq.ParquetFile(files[0]).schema_arrow.names)
    parts, offset = [], 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            lo, hi = np.searchsorted(positions, [offset, offset + batch.num_rows])
            if hi > lo:
                parts.append(pa.Table.from_batches([batch]).take(positions[lo:hi] - offset))
            offset += batch.num_rows
    return pa.concat_tables(parts)


def attribute(spec: ScoreSpec, features: dict[str, torch.Tensor], rows: pa.Table,
              scales: np.ndarray, how: str, batch_size: int = 8, device: str = "cpu"
              ) -> tuple[list[str], np.ndarray]:
    """Each unit's term of each row's aggregated score: (unit names, ``[rows, U]`` float64).

    ``features``: the preconditioned queries the corpus was scored against; ``scales``: the
    ranking's column scales, so the terms of a row add up to its ranked score.
    """
    model, tokenizer, units = model_and_units(spec, device)
    features = {k: v.to(device) for k, v in features.items()}
    scales_t = torch.from_numpy(np.asarray(scales, dtype=np.float64))
    terms = []
    for start in range(0, rows.num_rows, batch_size):
        part = rows.slice(start, batch_size)
        columns = {k: part.column(k).to_numpy(zero_copy_only=False)
                   for k in text_columns(part.column_names)}
        batch = to_tensors(columns, tokenizer, spec.tokenize, device)
        per_unit = unit_scores(model, units, batch, features, spec.influence).cpu()
        terms.append(contributions(per_unit, how, scales_t))
    return [u.name for u in units], torch.cat(terms).numpy()


def attribute_on_worker(spec: ScoreSpec, features, rows: pa.Table, scales: np.ndarray, how: str,
                        cluster: ClusterConfig):
    """Run ``attribute`` as a Ray task with one worker's resources (a GPU on ``cluster=gpu``);
    ``features`` may be the ObjectRef of the preconditioned queries. Returns the task's ref."""
    import ray

    def task(spec, features, rows, scales, how, cluster):
        pin_threads(cluster.threads_per_worker)
        return attribute(spec, features, rows, scales, how, cluster.batch_size,
                         device_for(cluster))

    remote = ray.remote(num_cpus=cluster.cpus_per_worker,
                        num_gpus=cluster.gpus_per_worker or 0, max_retries=1)(task)
    return remote.remote(spec, features, rows, scales, how, cluster)


def wait_for_attribution(ref) -> tuple[list[str], np.ndarray]:
    import ray
    return ray.get(ref)


def shares_column(names: list[str], terms: np.ndarray, positions: np.ndarray,
                  scores: np.ndarray) -> RowColumn:
    """The ``unit_shares`` column for the rows at ``positions`` and its metrics: how many rows,
    and the largest relative gap between a row's re-scored total and its ranked score (a
    check: float32 rounding, batches padded differently)."""
    shares = unit_shares(torch.from_numpy(terms)).numpy().astype(np.float32)
    arrow_field = pa.field(COLUMN, pa.list_(pa.float32()),
                           metadata={UNITS_KEY: json.dumps(names)})
    gap = np.abs(terms.sum(axis=1) - scores) / np.maximum(np.abs(scores), 1e-30)
    metrics = {"attribution/rows": len(positions),
               "attribution/undefined_rows": int(np.isnan(shares).any(axis=1).sum()),
               "attribution/score_rel_gap": float(gap.max()) if len(gap) else 0.0}
    return RowColumn(arrow_field, {int(p): s.tolist() for p, s in zip(positions, shares)},
                     metrics)


def attribution_step(raw_dir: Path, top_k: int, rescore: Rescore
                     ) -> Callable[[Ranking], RowColumn | None]:
    """``finalize``'s ``extra``: the top ``top_k`` rows re-scored per unit by ``rescore``."""

    def step(ranking: Ranking) -> RowColumn | None:
        positions = ranking.top(top_k)
        if not len(positions):
            return None
        names, terms = rescore(read_positions(raw_dir, positions), ranking.scales)
        return shares_column(names, terms, positions, ranking.direct[positions])

    return step


def units_of(schema: pa.Schema) -> list[str]:
    """The unit names of a scores table's ``unit_shares`` column ([] when it has none)."""
    if COLUMN not in schema.names:
        return []
    metadata = schema.field(COLUMN).metadata or {}
    return json.loads(metadata.get(UNITS_KEY, b"[]"))
