"""Ray Data views of the prepared (validated, normalised) Parquet files."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq

from cluster.runtime import ClusterConfig

# Below this many rows Ray Data reads a file as one block; split it so every worker gets work.
SMALL = 500_000
# A file up to this size is read here and handed to Ray Data as in-memory blocks: no listing,
# read or repartition tasks. Each of those starts worker processes, which cost a Ray Train job
# 8-11 s before its first batch on a 2-core machine (measured on the demo's fit and IBO jobs);
# larger files are streamed by read tasks as before, never held here.
IN_MEMORY_BYTES = 64 * 2**20


def read_prepared(path: Path, cluster: ClusterConfig, columns: list[str] | None = None):
    """A Ray Dataset over a prepared Parquet file, in enough blocks to feed every worker."""
    import ray
    rows = pq.ParquetFile(path).metadata.num_rows
    blocks = max(1, min(4 * cluster.num_workers, math.ceil(rows / cluster.batch_size)))
    if Path(path).stat().st_size <= IN_MEMORY_BYTES:
        table = pq.read_table(path, columns=columns)
        size = math.ceil(rows / blocks) if rows else 1
        return ray.data.from_arrow([table.slice(start, size)
                                    for start in range(0, max(rows, 1), size)])
    dataset = ray.data.read_parquet(str(path), columns=columns)
    if rows < SMALL:
        dataset = dataset.repartition(blocks)
    return dataset
