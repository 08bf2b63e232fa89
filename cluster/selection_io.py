"""The select stage's files: the contract's ``scores/`` table with its ``set`` column, and the
datasets each correction method reads (pairs, neutral, positive, retain, clean)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster.dataio import write_parquet_atomic
from operators.selection import NEGATIVE, NEUTRAL, POSITIVE, SelectionConfig, make_pairs, select_sets

SCORES_FILE = "scores.parquet"


def _write_table(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def write_selection(ranked: Path, config: SelectionConfig, scores_dir: Path, select_dir: Path,
                    label_column: str | None = None, seed: int = 0) -> dict:
    """Fill ``set`` with the α rule and write every dataset the correction methods read."""
    table = pq.read_table(ranked)
    table = table.drop([c for c in ("raw", "n_tokens") if c in table.column_names])
    scores = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    sets = select_sets(scores, config)
    front = ["id", "score", "rank", "set"]
    table = table.append_column("set", pa.array(sets.tolist(), type=pa.string()))
    table = table.select(front + [c for c in table.column_names if c not in front])
    _write_table(table, scores_dir / SCORES_FILE)
    rows = table.select(["id", "prompt", "response", "score"]).to_pylist()
    pairs = [{**{f"pos_{k}": rows[p][k] for k in ("id", "prompt", "response")},
              **{f"neg_{k}": rows[n][k] for k in ("id", "prompt", "response")}, "eps": eps}
             for p, n, eps in make_pairs(scores, sets, seed)] if _has_both(sets) else []
    top = max((r["score"] for r, s in zip(rows, sets) if s == POSITIVE), default=1.0) or 1.0
    positive = [{**r, "weight": r["score"] / top} for r, s in zip(rows, sets) if s == POSITIVE]
    neutral = [r for r, s in zip(rows, sets) if s == NEUTRAL]
    retain = [r for r, s in zip(rows, sets) if s in (NEUTRAL, NEGATIVE)]
    outputs = {"pairs": pairs, "positive": positive, "neutral": neutral, "retain": retain}
    if label_column and label_column in table.column_names:
        labels = table.column(label_column).to_pylist()
        outputs["clean"] = [r for r, bad in zip(rows, labels) if not bad]
    for name, data in outputs.items():
        if data:
            write_parquet_atomic(data, select_dir / f"{name}.parquet")
    return {"n_positive": int((sets == POSITIVE).sum()), "n_negative": int((sets == NEGATIVE).sum()),
            "n_neutral": int((sets == NEUTRAL).sum()), "n_pairs": len(pairs),
            "n_excluded": int((sets == "excluded").sum())}


def _has_both(sets: np.ndarray) -> bool:
    return bool((sets == POSITIVE).any() and (sets == NEGATIVE).any())
