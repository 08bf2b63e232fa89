"""The score stage's second pass (operators/second_hop.py): the first pass's top rows as queries.

After the first pass's raw shards are complete, its ranking names the sources (the top
``influence.expand_top_k`` rows with a positive score). Their text is read back from the raw
shards, preconditioned once as queries of their own (whole response, one query each) and the
corpus is scored against them by the same resumable shards, under ``work/hop``: the features,
the sources' ids (``sources.json``; other sources, e.g. after the first pass changed, discard
what is there) and ``raw/`` shards named as the first pass's, so the two line up row by row.
``combine`` then streams both to each row's final score and the source it came through.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cluster.attribution import read_positions
from cluster.scoring import Ranking, ScoreSpec, batches_of, column_scales_of, raw_matrix
from operators.second_hop import hop_config, second_hop

HOP = "hop"  # the second pass's folder under the score stage's work folder
SOURCES = "sources.json"


@dataclass(frozen=True)
class Hop:
    """The second pass: its raw shards and its sources (positions in the raw shards' row order,
    best first, and their ids)."""

    raw_dir: Path
    positions: np.ndarray
    ids: list[str]


def hop_spec(spec: ScoreSpec) -> ScoreSpec:
    """The sources are queries of their own over their whole response; no attribution."""
    return replace(spec, influence=hop_config(spec.influence), attribution_top_k=0,
                   judge_patterns=())


def source_positions(score: np.ndarray, rank: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` best-ranked rows with a finite, positive score, best first."""
    best = np.argsort(rank)[:k]
    return best[np.isfinite(score[best]) & (score[best] > 0)]


def source_rows(raw_dir: Path, positions: np.ndarray) -> list[dict]:
    """The sources' rows (their text columns), best first, read back from the raw shards."""
    order = np.argsort(positions)
    table = read_positions(raw_dir, positions[order]).to_pylist()
    rows = [None] * len(positions)
    for i, row in zip(order, table):
        rows[i] = row
    return rows


def prepare_folder(work: Path, ids: list[str]) -> Path:
    """``work/hop`` for these sources: what an attempt with other sources left is removed."""
    folder = work / HOP
    marker = folder / SOURCES
    if folder.exists() and (not marker.is_file() or json.loads(marker.read_text()) != ids):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(ids))
    return folder


def combine(hop: Hop, files: list[Path], first: Ranking) -> tuple[np.ndarray, np.ndarray]:
    """(final score, via) in the raw shards' row order: ``via`` holds the id of the source a
    row's score came through, None where the row kept its first-pass score."""
    hop_files = sorted(hop.raw_dir.glob("*.parquet"))
    if [f.name for f in hop_files] != [f.name for f in files]:
        raise RuntimeError(f"the second pass's shards in {hop.raw_dir} do not match the first "
                           "pass's: rerun to rescore them")
    scales = torch.from_numpy(column_scales_of(hop_files))
    ids, first = first.ids, first.score
    sources = torch.from_numpy(first[hop.positions])
    final, via, offset = first.copy(), np.full(len(first), None, dtype=object), 0
    for path in hop_files:
        for batch in batches_of(path, ["id", "raw"]):
            rows = slice(offset, offset + batch.num_rows)
            if batch.column(0).to_pylist() != list(ids[rows]):
                raise RuntimeError(f"{path}: rows out of line with the first pass")
            raw = torch.from_numpy(raw_matrix(batch.column(1)))
            score, came = second_hop(torch.from_numpy(first[rows]), sources, raw, scales)
            final[rows] = score.numpy()
            via[rows] = [hop.ids[j] if j >= 0 else None for j in came.tolist()]
            offset += batch.num_rows
    return final, via
