"""Per-sublayer attribution of the top-ranked rows, written as a column of the ranked shards.

The raw shards hold one score per query batch (``[G]`` a row); keeping every unit's term there
would grow them U-fold for rows nobody looks at. So after ranking, only the
``influence.attribution_top_k`` best rows are re-scored per unit (``operators.scores.
unit_scores``), once, as one Ray task with one worker's resources, against the same
preconditioned queries and column scales as the ranking. Their shares of the score
(``operators.attribution``) become the ``unit_shares`` column: ``list<float32>``, one value per
unit, null for the other rows; the unit names are in the column's field metadata
(``lancet.units``, a JSON list), which Parquet keeps through the select stage's ``scores/``.

The same task measures the same rows' dependence on each sublayer (``operators.dependence``):
each sublayer mean-ablated in turn, against ``influence.attribution_contrast`` ordinary rows
drawn (seeded) from outside the top. Each row's percentiles among those rows' loss increases
become the ``unit_dependence`` column (names under ``lancet.sublayers``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cluster.batches import text_columns, to_tensors
from cluster.runtime import ClusterConfig, device_for, pin_threads
from cluster.scoring import BATCH_ROWS, Ranking, RowColumn, ScoreSpec, model_and_units
from operators.attribution import contributions, unit_shares
from operators.dependence import dependence
from operators.scores import unit_scores
from operators.units import UnsupportedModelError

COLUMN = "unit_shares"
UNITS_KEY = b"lancet.units"
DEPENDENCE = "unit_dependence"
SUBLAYERS_KEY = b"lancet.sublayers"
CONTRAST_SEED = 0  # which ordinary rows form the contrast: the same on every rerun


@dataclass(frozen=True)
class Attribution:
    """The top rows' per-unit terms of their scores and, given a contrast, their percentiles
    of dependence on each sublayer."""

    names: list[str]  # the method's units
    terms: np.ndarray  # [rows, U] float64
    sublayers: list[str]  # the model's attention and feed-forward sublayers ([] without)
    percentiles: np.ndarray | None  # [rows, M] float64; None without a contrast
    skipped: str = ""  # why there is no dependence although a contrast was given


# (top rows, contrast rows or None, column scales) -> Attribution: in process or a Ray task
Rescore = Callable[[pa.Table, "pa.Table | None", np.ndarray], Attribution]


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
              scales: np.ndarray, how: str, batch_size: int = 8, device: str = "cpu",
              contrast: pa.Table | None = None) -> Attribution:
    """Each unit's term of each row's aggregated score and, with ``contrast``, each row's
    dependence percentiles (``operators.dependence``), from one load of the model.

    ``features``: the preconditioned queries the corpus was scored against; ``scales``: the
    ranking's column scales, so the terms of a row add up to its ranked score.
    """
    model, tokenizer, units = model_and_units(spec, device)
    features = {k: v.to(device) for k, v in features.items()}
    scales_t = torch.from_numpy(np.asarray(scales, dtype=np.float64))
    top = _batches(rows, tokenizer, spec, batch_size, device)
    terms = [contributions(unit_scores(model, units, batch, features, spec.influence).cpu(),
                           how, scales_t) for batch in top]
    names = [u.name for u in units]
    if contrast is None or not contrast.num_rows:
        return Attribution(names, torch.cat(terms).numpy(), [], None)
    try:
        sublayers, percentiles = dependence(
            model, top, _batches(contrast, tokenizer, spec, batch_size, device))
    except UnsupportedModelError as e:  # e.g. ekfac on blocks without a known MLP child
        return Attribution(names, torch.cat(terms).numpy(), [], None, f"no dependence: {e}")
    return Attribution(names, torch.cat(terms).numpy(), sublayers, percentiles.cpu().numpy())


def _batches(rows: pa.Table, tokenizer, spec: ScoreSpec, size: int, device: str) -> list[dict]:
    out = []
    for start in range(0, rows.num_rows, size):
        part = rows.slice(start, size)
        columns = {k: part.column(k).to_numpy(zero_copy_only=False)
                   for k in text_columns(part.column_names)}
        out.append(to_tensors(columns, tokenizer, spec.tokenize, device))
    return out


def attribute_on_worker(spec: ScoreSpec, features, rows: pa.Table, contrast: pa.Table | None,
                        scales: np.ndarray, how: str, cluster: ClusterConfig):
    """Run ``attribute`` as a Ray task with one worker's resources (a GPU on ``cluster=gpu``);
    ``features`` may be the ObjectRef of the preconditioned queries. Returns the task's ref."""
    import ray

    def task(spec, features, rows, contrast, scales, how, cluster):
        pin_threads(cluster.threads_per_worker)
        return attribute(spec, features, rows, scales, how, cluster.batch_size,
                         device_for(cluster), contrast)

    remote = ray.remote(num_cpus=cluster.cpus_per_worker,
                        num_gpus=cluster.gpus_per_worker or 0, max_retries=1)(task)
    return remote.remote(spec, features, rows, contrast, scales, how, cluster)


def wait_for_attribution(ref) -> Attribution:
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


def dependence_column(names: list[str], percentiles: np.ndarray, positions: np.ndarray,
                      contrast_rows: int) -> RowColumn:
    """The ``unit_dependence`` column for the rows at ``positions`` and its metrics."""
    arrow_field = pa.field(DEPENDENCE, pa.list_(pa.float32()),
                           metadata={SUBLAYERS_KEY: json.dumps(names)})
    values = percentiles.astype(np.float32)
    return RowColumn(arrow_field, {int(p): v.tolist() for p, v in zip(positions, values)},
                     {"attribution/dependence_rows": len(positions),
                      "attribution/contrast_rows": contrast_rows})


def contrast_positions(ranking: Ranking, top: np.ndarray, n: int,
                       seed: int = CONTRAST_SEED) -> np.ndarray:
    """Up to ``n`` positions drawn without replacement from the rows with a finite score
    outside ``top``, ascending."""
    pool = np.setdiff1d(np.nonzero(np.isfinite(ranking.score))[0], top)
    if not n or not len(pool):
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(pool, size=min(n, len(pool)),
                                                      replace=False))


def attribution_step(raw_dir: Path, top_k: int, contrast_rows: int, rescore: Rescore
                     ) -> Callable[[Ranking], list[RowColumn]]:
    """``finalize``'s ``extra``: the top ``top_k`` rows re-scored per unit by ``rescore``, and
    their dependence against ``contrast_rows`` ordinary rows (0: none)."""

    def step(ranking: Ranking) -> list[RowColumn]:
        positions = ranking.top(top_k)
        if not len(positions):
            return []
        others = contrast_positions(ranking, positions, contrast_rows)
        both = np.union1d(positions, others)
        table = read_positions(raw_dir, both)
        rows = table.take(np.searchsorted(both, positions))
        contrast = table.take(np.searchsorted(both, others)) if len(others) else None
        found = rescore(rows, contrast, ranking.scales)
        columns = [shares_column(found.names, found.terms, positions,
                                 ranking.direct[positions])]
        if found.percentiles is not None:
            columns.append(dependence_column(found.sublayers, found.percentiles, positions,
                                             len(others)))
        return columns

    return step


def units_of(schema: pa.Schema, column: str = COLUMN) -> list[str]:
    """The names behind a scores table's ``unit_shares`` (units) or ``unit_dependence``
    (sublayers) column ([] when it has none)."""
    if column not in schema.names:
        return []
    metadata = schema.field(column).metadata or {}
    key = SUBLAYERS_KEY if column == DEPENDENCE else UNITS_KEY
    return json.loads(metadata.get(key, b"[]"))
