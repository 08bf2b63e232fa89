"""The select stage's files: the contract's ``scores/`` table with its ``set`` column, and the
datasets each correction method reads (pairs, neutral, positive, retain, clean)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.atomic import atomic
from cluster.batches import text_columns
from operators.selection import NEGATIVE, NEUTRAL, POSITIVE, SelectionConfig, make_pairs, select_sets

SCORES_FILE = "scores.parquet"


def _write_table(table: pa.Table, path: Path) -> None:
    with atomic(path) as tmp:
        pq.write_table(table, tmp)


def write_selection(ranked: Path, config: SelectionConfig, scores_dir: Path, select_dir: Path,
                    label_column: str | None = None, seed: int = 0) -> dict:
    """Fill ``set`` with the α rule and write every dataset the correction methods read.

    ``ranked`` is a Parquet file or a folder of shards; ``scores/`` comes out in rank order. The
    corpus stays in Arrow columns (no Python object per row): the sets are column filters.
    """
    table = pq.read_table(ranked)
    if "rank" in table.column_names:
        table = table.sort_by("rank")
    table = table.drop([c for c in ("raw", "n_tokens") if c in table.column_names])
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    inhibition = (table.column("inhibition").to_numpy(zero_copy_only=False).astype(np.float64)
                  if "inhibition" in table.column_names else None)
    sets = select_sets(scores, config, inhibition)
    front = ["id", "score", "rank", "set"]
    table = table.append_column("set", pa.array(sets.tolist(), type=pa.string()))
    table = table.select(front + [c for c in table.column_names if c not in front])
    _write_table(table, scores_dir / SCORES_FILE)
    core = table.select(text_columns(table.column_names) + ["score"])
    outputs = {"pairs": _pairs(core, scores, sets, seed, inhibition, config.pair_power),
               "positive": _positive(core, sets),
               "neutral": core.filter(pa.array(sets == NEUTRAL)),
               "retain": core.filter(pa.array((sets == NEUTRAL) | (sets == NEGATIVE)))}
    if label_column and label_column in table.column_names:
        bad = table.column(label_column).to_numpy(zero_copy_only=False).astype(bool)
        outputs["clean"] = core.filter(pa.array(~bad))
    for name, data in outputs.items():
        if data.num_rows:
            _write_table(data, select_dir / f"{name}.parquet")
    return {"n_positive": int((sets == POSITIVE).sum()), "n_negative": int((sets == NEGATIVE).sum()),
            "n_neutral": int((sets == NEUTRAL).sum()), "n_pairs": outputs["pairs"].num_rows,
            "n_excluded": int((sets == "excluded").sum())}


def _pairs(core: pa.Table, scores: np.ndarray, sets: np.ndarray, seed: int,
           inhibition: np.ndarray | None, power: float = 1.0) -> pa.Table:
    """``pos_*``/``neg_*`` columns and ε per pair (none unless both sets exist)."""
    pairs = make_pairs(scores, sets, seed, inhibition, power) if _has_both(sets) else []
    columns = {}
    for prefix, side in (("pos_", 0), ("neg_", 1)):
        picked = core.take(pa.array([p[side] for p in pairs], type=pa.int64()))
        columns.update({f"{prefix}{k}": picked.column(k) for k in text_columns(core.column_names)})
    columns["eps"] = pa.array([p[2] for p in pairs], type=pa.float64())
    return pa.table(columns)


def _positive(core: pa.Table, sets: np.ndarray) -> pa.Table:
    """The positive set with ``weight`` = score ÷ the largest positive score."""
    positive = core.filter(pa.array(sets == POSITIVE))
    score = positive.column("score").to_numpy(zero_copy_only=False)
    top = float(score.max()) if len(score) else 1.0
    return positive.append_column("weight", pa.array(score / (top or 1.0), type=pa.float64()))
def _has_both(sets: np.ndarray) -> bool:
    return bool((sets == POSITIVE).any() and (sets == NEGATIVE).any())
