"""Ray Data views of the prepared (validated, normalised) Parquet files."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq

from cluster.runtime import ClusterConfig

# Below this many rows Ray Data reads a file as one block; split it so every worker gets work.
SMALL = 500_000


def read_prepared(path: Path, cluster: ClusterConfig, columns: list[str] | None = None):
    """A Ray Dataset over a prepared Parquet file, in enough blocks to feed every worker."""
    import ray
    dataset = ray.data.read_parquet(str(path), columns=columns)
    rows = pq.ParquetFile(path).metadata.num_rows
    if rows < SMALL:
        blocks = max(1, min(4 * cluster.num_workers, math.ceil(rows / cluster.batch_size)))
        dataset = dataset.repartition(blocks)
    return dataset
