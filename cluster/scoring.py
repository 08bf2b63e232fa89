"""Scoring the corpus: preconditioned queries in the object store, a Ray Data actor pool, Parquet.

1. ``precondition_on_worker`` (once, a Ray task on a worker's device): the query gradients,
   streamed into their ``query_batch_size`` groups and averaged, get one IHVP per group (and,
   with ``influence.query_rank``, a low-rank compression); the result stays in the object store
   and is shared by every scorer.
2. ``score_corpus``: ``map_batches`` with the stateful ``Scorer`` (``concurrency=N``): each actor
   loads the model and the preconditioned queries once, then maps batches of rows to their raw
   per-query-batch scores (a fixed-size list column ``raw``), passing the row's columns through.
3. ``finalize``: streams the raw shards (column scales; ids and scores; the rows) and writes
   ranked shards, one row per training id with ``score`` and ``rank``; memory holds one record
   batch and the (id, score, rank) of each row needed to rank, never the corpus's text. Between
   ranking and writing, the top rows can be re-scored per unit (``cluster.attribution``) and
   their shares written as one more column, and the second hop's shards (``cluster.second_hop``)
   can raise scores, streamed the same way.

The score stage runs step 2 by fixed row ranges (``cluster.score_shards``), so that a killed
stage resumes with the ranges it finished; ``score_corpus`` streams a whole dataset at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import torch

from cluster.atomic import atomic
from cluster.batches import (
    TURNS,
    TokenizeConfig,
    encode_row,
    iter_row_batches,
    text_columns,
    to_tensors,
)
from cluster.factor_job import load_curvature
from cluster.model_io import DTYPES, load_model, load_tokenizer
from cluster.progress import report
from cluster.runtime import ClusterConfig, device_for, pin_threads
from operators.errors import UserError
from operators.factors import stat_dtype
from operators.query_parts import query_rows as in_parts
from operators.scores import (
    InfluenceConfig,
    aggregate,
    grouping_order,
    inhibition,
    precondition_queries,
    score_batch,
    units_for,
)

BATCH_ROWS = 4096  # rows per record batch when streaming the scored shards


@dataclass(frozen=True)
class ScoreSpec:
    """What to score with: model, method, tokenization."""

    model_path: str
    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    dtype: str = "float32"
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    trust_remote_code: bool = False
    # re-score this many top-ranked rows per unit for their per-sublayer shares (0: none)
    attribution_top_k: int = 100
    # ... and measure those rows' dependence on each sublayer against this many others (0: no)
    attribution_contrast: int = 256
    # the keyword judge's patterns: the ``judged`` query part's tokens (empty: no such part)
    judge_patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if int(self.attribution_top_k) < 0:
            raise UserError(f"influence.attribution_top_k={self.attribution_top_k}: must be "
                            ">= 0 (0 turns the attribution off)")
        if int(self.attribution_contrast) < 0:
            raise UserError(f"influence.attribution_contrast={self.attribution_contrast}: must "
                            "be >= 0 (0 turns the dependence off)")

    @property
    def attributes(self) -> bool:
        """Whether the score stage attributes its top rows (a method with units, k > 0)."""
        return self.attribution_top_k > 0 and self.influence.kind.units is not None


def model_and_units(spec: ScoreSpec, device: str = "cpu"):
    """The model (on ``device``), its tokenizer and the units ``spec``'s method scores over."""
    config = spec.influence
    model = load_model(spec.model_path, spec.dtype, config.kind.attention_weights,
                       spec.trust_remote_code, device)
    tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
    units = units_for(model, config)
    return model, tokenizer, units


def precondition(spec: ScoreSpec, query_rows: list[dict], factor_dir: Path | None,
                 batch_size: int = 8, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Preconditioned query features ``name -> [num_query_batches, ...]`` on the CPU.

    Streams the queries ``batch_size`` at a time on ``device``; the curvature is moved there
    once, in the compute dtype (float32, or float64 for a float64 model).
    """
    model, tokenizer, units = model_and_units(spec, device)
    curvature = None
    if spec.influence.uses_curvature:
        curvature, names = load_curvature(factor_dir)
        if names != [u.name for u in units]:
            raise UserError(f"factors in {factor_dir} were fitted for other units than "
                             f"influence.method={spec.influence.method} on this model")
        curvature = curvature.to(device, stat_dtype(DTYPES[spec.dtype]))
    def batches(rows):
        return (to_tensors(cols, tokenizer, spec.tokenize, device)
                for cols in iter_row_batches(rows, batch_size))

    query_rows = query_part_rows(spec, query_rows, tokenizer)
    order = grouping_order(model, units, batches(query_rows), spec.influence)
    rows = query_rows if order is None else [query_rows[i] for i in order]
    features = precondition_queries(model, units, batches(rows), spec.influence, curvature)
    return {k: v.cpu() for k, v in features.items()}


def query_part_rows(spec: ScoreSpec, rows: list[dict], tokenizer) -> list[dict]:
    """Each query as one row per ``influence.query_parts`` part (operators/query_parts.py),
    tokenized as every stage tokenizes it."""
    return in_parts(spec.influence, rows, spec.judge_patterns,
                    lambda r: encode_row(tokenizer, spec.tokenize, r["prompt"], r["response"],
                                         r.get(TURNS)), tokenizer)


def precondition_on_worker(spec: ScoreSpec, query_rows: list[dict], factor_dir: Path | None,
                           cluster: ClusterConfig):
    """Run ``precondition`` as a Ray task with one worker's resources (a GPU on ``cluster=gpu``).

    Returns the task's ObjectRef: the features go from the worker to the object store and on to
    every scorer without passing through the driver.
    """
    import ray

    def task(spec, rows, factor_dir, cluster):
        pin_threads(cluster.threads_per_worker)
        return precondition(spec, rows, factor_dir, cluster.batch_size, device_for(cluster))

    remote = ray.remote(num_cpus=cluster.cpus_per_worker,
                        num_gpus=cluster.gpus_per_worker or 0, max_retries=1)(task)
    return remote.remote(spec, query_rows, factor_dir, cluster)


class Scorer:
    """Stateful ``map_batches`` callable: rows → rows + ``raw`` scores ``[num_query_batches]``."""

    def __init__(self, spec: ScoreSpec, features_ref: list, cluster: ClusterConfig,
                 progress=None) -> None:
        import ray
        self.progress = progress
        pin_threads(cluster.threads_per_worker)
        self.device = device_for(cluster)
        self.spec = spec
        self.model, self.tokenizer, self.units = model_and_units(spec, self.device)
        features = ray.get(features_ref[0])
        self.features = {k: v.to(self.device) for k, v in features.items()}

    def __call__(self, table: pa.Table) -> pa.Table:
        columns = {k: table.column(k).to_numpy(zero_copy_only=False)
                   for k in text_columns(table.column_names)}
        batch = to_tensors(columns, self.tokenizer, self.spec.tokenize, self.device)
        raw = score_batch(self.model, self.units, batch, self.features, self.spec.influence)
        raw = raw.cpu().numpy().astype(np.float64)
        flat = pa.array(raw.reshape(-1), type=pa.float64())
        tokens = pa.array(batch["attention_mask"].sum(1).cpu().numpy(), type=pa.int64())
        report(self.progress, len(table), pa.compute.sum(tokens).as_py() or 0)
        table = table.append_column("n_tokens", tokens)
        return table.append_column("raw", pa.FixedSizeListArray.from_arrays(flat, raw.shape[1]))


def score_corpus(dataset, spec: ScoreSpec, features, cluster: ClusterConfig, raw_dir: Path,
                 progress=None) -> dict:
    """Stream ``dataset`` through an actor pool; write raw score shards to ``raw_dir``.

    ``features``: the preconditioned queries, a dict of tensors or the ObjectRef of one
    (``precondition_on_worker``), shared by every scorer through the object store.
    ``progress``: a ``cluster.progress.Progress`` counter the actors feed after each batch.
    """
    import ray
    if not isinstance(features, ray.ObjectRef):
        features = ray.put({k: v.cpu() for k, v in features.items()})  # put once, shared
    features_ref = [features]  # in a list, so Ray hands the actors the ref, not the value
    start = time.perf_counter()
    scored = dataset.map_batches(
        Scorer, fn_constructor_kwargs={"spec": spec, "features_ref": features_ref,
                                       "cluster": cluster, "progress": progress},
        batch_size=cluster.batch_size, batch_format="pyarrow", concurrency=cluster.num_workers,
        **cluster.actor_options())
    scored.write_parquet(str(raw_dir))
    seconds = time.perf_counter() - start
    rows, tokens = 0, 0
    for path in raw_dir.glob("*.parquet"):
        counts = pq.read_table(path, columns=["n_tokens"]).column(0)
        rows, tokens = rows + len(counts), tokens + int(pa.compute.sum(counts).as_py() or 0)
    return {"sequences": rows, "tokens": tokens, "seconds": seconds,
            "sequences_per_s": rows / max(seconds, 1e-9),
            "tokens_per_s": tokens / max(seconds, 1e-9)}


def column_scales_of(files: list[Path]) -> np.ndarray:
    """Unbiased standard deviation of each raw column over the finite rows (streamed)."""
    n, total, squares = 0, None, None
    for path in files:
        for batch in batches_of(path, ["raw"]):
            raw = raw_matrix(batch.column(0))
            raw = raw[np.isfinite(raw).all(axis=1)]
            n += raw.shape[0]
            total = raw.sum(0) if total is None else total + raw.sum(0)
            squares = (raw ** 2).sum(0) if squares is None else squares + (raw ** 2).sum(0)
    if total is None or n < 2:  # as operators.scores.column_scales
        return np.ones(0 if total is None else total.shape)
    var = (squares - total ** 2 / n) / (n - 1)
    std = np.sqrt(np.clip(var, 0, None))
    return np.where(std > 0, std, 1.0)


def raw_matrix(column) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    width = column.type.list_size  # a copy: Arrow's buffers are read-only (torch warns on them)
    return np.array(column.flatten().to_numpy(zero_copy_only=False)).reshape(-1, width)


@dataclass(frozen=True)
class Ranking:
    """Every row's id, score and rank, in the raw shards' row order, and the column scales."""

    ids: np.ndarray
    score: np.ndarray
    rank: np.ndarray
    scales: np.ndarray  # [num_query_batches]: each raw column's std (``aggregate``'s scales)
    inhibition: np.ndarray | None = None  # operators.scores.inhibition, for the negative set
    # with the second hop (cluster/second_hop.py): the first pass's score, and the id of the
    # source each row's score came through (None: its own)
    first: np.ndarray | None = None
    via: np.ndarray | None = None

    @property
    def direct(self) -> np.ndarray:
        """Each row's own score against the queries (the first pass)."""
        return self.score if self.first is None else self.first

    def top(self, k: int) -> np.ndarray:
        """Positions (raw shards' row order) of the ``k`` best ranks with a finite score,
        ascending."""
        best = np.argsort(self.rank)[:k]
        return np.sort(best[np.isfinite(self.score[best])])


@dataclass(frozen=True)
class RowColumn:
    """A column added to the ranked shards: a value for some rows (by position), null for the
    others; ``metrics`` join ``finalize``'s summary."""

    arrow_field: pa.Field
    values: dict[int, object]
    metrics: dict = field(default_factory=dict)


# (first pass's files, its ranking) -> (final score, via): the second hop (cluster/second_hop.py)
Hop = Callable[[list[Path], "Ranking"], tuple[np.ndarray, np.ndarray]]


def rank_rows(raw_dir: Path, how: str, hop: Hop | None = None,
              first: Ranking | None = None) -> Ranking:
    """Stream the raw shards twice (column scales; ids and scores) and rank every row (or take
    ``first``, that ranking already made); with ``hop``, rank again by the scores the second
    hop raised."""
    files = sorted(raw_dir.glob("*.parquet"))
    if first is None:
        scales = column_scales_of(files)
        ids, score, inhibit = _ids_and_scores(files, scales, how, raw_dir)
        first = Ranking(ids, score, _ranks(ids, score), scales, inhibit)
    if hop is None:
        return first
    final, via = hop(files, first)
    return Ranking(first.ids, final, _ranks(first.ids, final), first.scales, first.inhibition,
                   first=first.score, via=via)


def _ranks(ids: np.ndarray, score: np.ndarray) -> np.ndarray:
    """1 = best; ties by id; non-finite scores last."""
    order = np.lexsort((ids.astype(str), -np.nan_to_num(score, nan=-np.inf)))
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(1, len(ids) + 1)
    return rank


def finalize(raw_dir: Path, out_dir: Path, how: str,
             extra: Callable[[Ranking], list[RowColumn]] | None = None,
             hop: Hop | None = None, first: Ranking | None = None) -> dict:
    """Write ``out_dir/part-*.parquet``: every row with ``score`` and ``rank``, once each.

    Streams the raw shards three times (column scales; ids and scores; the rows themselves), so
    memory holds one record batch plus an (id, score, rank) triple per row, not the corpus. The
    folder appears under its final name only when complete. ``extra`` (given the ranking, before
    the rows are written) may add columns, e.g. the top rows' attribution; ``hop`` raises
    scores by the second pass (then a ``via`` column names each raised row's source); ``first``:
    the raw shards' ranking when the caller has made it already.
    """
    files = sorted(raw_dir.glob("*.parquet"))
    ranking = rank_rows(raw_dir, how, hop, first)
    columns = extra(ranking) if extra is not None else []
    with atomic(out_dir) as tmp:
        tmp.mkdir()
        offset = 0
        for number, path in enumerate(files):
            offset = _write_ranked(path, tmp / f"part-{number:05d}.parquet", ranking, offset,
                                   columns)
    bad = [str(ranking.ids[i]) for i in np.nonzero(~np.isfinite(ranking.score))[0]]
    raised = 0 if ranking.via is None else int(sum(v is not None for v in ranking.via))
    return {"rows": len(ranking.ids), "nonfinite_ids": bad[:100], "nonfinite": len(bad),
            "query_batches": len(ranking.scales), "raised_by_second_hop": raised,
            **{k: v for column in columns for k, v in column.metrics.items()}}


def batches_of(path: Path, columns: list[str] | None = None):
    yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)


def _ids_and_scores(files: list[Path], scales: np.ndarray, how: str, raw_dir: Path):
    """Every row's id and final score, in file order; a repeated id is an error."""
    ids, scores, inhibits, seen = [], [], [], set()
    for path in files:
        for batch in batches_of(path, ["id", "raw"]):
            chunk = batch.column(0).to_pylist()
            seen.update(chunk)
            ids.extend(chunk)
            raw = torch.from_numpy(raw_matrix(batch.column(1)))
            scores.append(aggregate(raw, how, torch.from_numpy(scales)).numpy())
            inhibits.append(inhibition(raw, how, torch.from_numpy(scales)).numpy())
    if len(seen) != len(ids):
        raise RuntimeError(f"scoring produced duplicate ids under {raw_dir}: a retry wrote twice")
    return np.array(ids, dtype=object), _joined(scores), _joined(inhibits)


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(chunks) if chunks else np.zeros(0)


def _write_ranked(path: Path, out: Path, ranking: Ranking, offset: int,
                  columns: list[RowColumn] = ()) -> int:
    """One raw shard with ``score`` and ``rank`` (the whole corpus's, from ``offset``) in front,
    ``inhibition``, ``via`` and ``columns`` after the shard's own; returns the next row offset."""
    writer = None
    for batch in batches_of(path):
        rows = slice(offset, offset + batch.num_rows)
        table = pa.Table.from_batches([batch])
        table = table.append_column("score", pa.array(ranking.score[rows], type=pa.float64()))
        table = table.append_column("rank", pa.array(ranking.rank[rows]))
        if ranking.inhibition is not None:
            table = table.append_column("inhibition", pa.array(ranking.inhibition[rows],
                                                               type=pa.float64()))
        if ranking.via is not None:
            table = table.append_column("via", pa.array(list(ranking.via[rows]),
                                                        type=pa.string()))
        for column in columns:
            values = [column.values.get(i) for i in range(rows.start, rows.stop)]
            table = table.append_column(column.arrow_field,
                                        pa.array(values, type=column.arrow_field.type))
        front = ["id", "score", "rank"]
        table = table.select(front + [c for c in table.column_names if c not in front])
        writer = writer or pq.ParquetWriter(out, table.schema)
        writer.write_table(table)
        offset += batch.num_rows
    if writer is not None:
        writer.close()
    return offset
