"""Scoring that resumes by shard: a killed or failed score stage keeps what it finished.

The prepared corpus is cut into fixed row ranges (at most ``shard_rows`` each, at least one per
worker), so a shard holds the same rows on every rerun with the same number of workers. Each
scorer actor of a Ray Data pool takes one range, scores it in ``cluster.batch_size`` batches and
writes its raw scores to ``work/raw/rows-<start>-<stop>.parquet`` under a temporary name, then
renames it: a shard file is complete or absent. A rerun scores only the ranges whose file is
missing; a retried actor rewrites its range under the same name, so no row is ever scored into
two files. The preconditioned queries are saved next to the shards once
(``features.safetensors``), so a resumed run scores against exactly the same queries.
"""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from cluster.atomic import atomic
from cluster.runtime import ClusterConfig, pin_threads
from cluster.scoring import Scorer, ScoreSpec, precondition
from operators.errors import UserError

FEATURES = "features.safetensors"
RAW = "raw"


def plan_shards(train: Path, shard_rows: int, workers: int = 1) -> list[tuple[int, int]]:
    """The row ranges ``[start, stop)`` covering ``train``: at most ``shard_rows`` rows each,
    equal sizes, and at least ``workers`` of them (when there are as many rows), so a corpus
    smaller than one shard still keeps every worker busy."""
    if shard_rows < 1:
        raise UserError(f"cluster.score_shard_rows={shard_rows}: must be >= 1")
    total = pq.ParquetFile(train).metadata.num_rows
    count = max(-(-total // shard_rows), min(workers, total))
    size = -(-total // count) if count else 1
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def shard_name(start: int, stop: int) -> str:
    return f"rows-{start:012d}-{stop:012d}.parquet"


def read_rows(train: Path, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of ``train``, reading only the row groups that hold them."""
    meta = pq.ParquetFile(train).metadata
    groups, first, offset = [], None, 0
    for number in range(meta.num_row_groups):
        size = meta.row_group(number).num_rows
        if offset < stop and offset + size > start:
            groups.append(number)
            first = offset if first is None else first
        offset += size
    table = pq.ParquetFile(train).read_row_groups(groups)
    return table.slice(start - first, stop - start)


def write_atomic(table: pa.Table, path: Path) -> None:
    with atomic(path) as tmp:
        pq.write_table(table, tmp)


class ShardScorer:
    """``map_batches`` callable: a batch of ranges → each range scored and written atomically."""

    def __init__(self, spec: ScoreSpec, features_ref: list, cluster: ClusterConfig, train: str,
                 raw_dir: str, progress=None) -> None:
        self.scorer = Scorer(spec, features_ref, cluster, progress)
        self.batch_size, self.train, self.raw_dir = cluster.batch_size, Path(train), Path(raw_dir)

    def __call__(self, ranges: dict) -> dict:
        rows, tokens = [], []
        for start, stop in zip(ranges["start"], ranges["stop"]):
            table = read_rows(self.train, int(start), int(stop))
            parts = [self.scorer(table.slice(i, self.batch_size))
                     for i in range(0, table.num_rows, self.batch_size)]
            scored = pa.concat_tables(parts)
            write_atomic(scored, self.raw_dir / shard_name(int(start), int(stop)))
            rows.append(scored.num_rows)
            tokens.append(pa.compute.sum(scored.column("n_tokens")).as_py() or 0)
        return {"rows": rows, "tokens": tokens}


def _load(path: str) -> dict:
    from safetensors.torch import load_file
    return load_file(path)


def features_in(work: Path, spec: ScoreSpec, query_rows: list[dict], factor_dir: Path | None,
                cluster: ClusterConfig):
    """The preconditioned queries' ObjectRef: from ``work/features.safetensors`` when a former
    attempt saved them, else computed once on a worker, which saves them there."""
    import ray
    from safetensors.torch import save_file
    path = work / FEATURES
    if path.is_file():  # read on a worker too: the driver never holds the queries
        return ray.remote(num_cpus=cluster.cpus_per_worker)(_load).remote(str(path))

    def task(spec, rows, factor_dir, cluster):
        from cluster.runtime import device_for
        pin_threads(cluster.threads_per_worker)
        features = precondition(spec, rows, factor_dir, cluster.batch_size, device_for(cluster))
        with atomic(path) as tmp:
            save_file({k: v.contiguous() for k, v in features.items()}, str(tmp))
        return features

    remote = ray.remote(num_cpus=cluster.cpus_per_worker,
                        num_gpus=cluster.gpus_per_worker or 0, max_retries=1)(task)
    return remote.remote(spec, query_rows, factor_dir, cluster)


def missing_shards(work: Path, shards: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The planned ranges without a finished file; files of another plan are removed."""
    raw = work / RAW
    raw.mkdir(parents=True, exist_ok=True)
    planned = {shard_name(*s) for s in shards}
    for path in raw.glob("*.parquet"):
        if path.name not in planned:  # cut with another shard size: its rows would repeat
            path.unlink()
    return [s for s in shards if not (raw / shard_name(*s)).is_file()]


def score_shards(train: Path, todo: list[tuple[int, int]], spec: ScoreSpec, features,
                 cluster: ClusterConfig, work: Path, progress=None) -> dict:
    """Score the ranges ``todo`` of ``train`` into ``work/raw``; rows, tokens and seconds."""
    import ray
    start = time.perf_counter()
    if not todo:
        return {"sequences": 0, "tokens": 0, "seconds": 0.0}
    ranges = ray.data.from_items([{"start": a, "stop": b} for a, b in todo],
                                 override_num_blocks=len(todo))
    done = ranges.map_batches(
        ShardScorer, fn_constructor_kwargs={
            "spec": spec, "features_ref": [features], "cluster": cluster, "train": str(train),
            "raw_dir": str(work / RAW), "progress": progress},
        batch_size=1, batch_format="numpy", concurrency=min(cluster.num_workers, len(todo)),
        **cluster.actor_options())
    written = done.take_all()
    return {"sequences": sum(int(r["rows"]) for r in written),
            "tokens": sum(int(r["tokens"]) for r in written),
            "seconds": time.perf_counter() - start}
