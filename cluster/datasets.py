"""Ray Data views of the prepared (validated, normalised) Parquet files."""

from __future__ import annotations

from pathlib import Path

from cluster.runtime import ClusterConfig


def read_prepared(path: Path, cluster: ClusterConfig, columns: list[str] | None = None):
    """A Ray Dataset over a prepared Parquet file, in enough blocks to feed every worker."""
    import ray
    return ray.data.read_parquet(str(path), columns=columns,
                                 override_num_blocks=max(2 * cluster.num_workers, 2))
