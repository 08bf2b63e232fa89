"""Resumable scoring: fixed row-range shards, reused when finished (cluster/score_shards.py)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster.score_shards import RAW, missing_shards, plan_shards, read_rows, shard_name


@pytest.fixture
def train(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(23)]}), path, row_group_size=5)
    return path


def test_shards_are_fixed_row_ranges_covering_every_row_once(train):
    shards = plan_shards(train, 10)
    assert shards == [(0, 8), (8, 16), (16, 23)]  # at most 10 rows each, as equal as can be
    assert plan_shards(train, 100, workers=4) == [(0, 6), (6, 12), (12, 18), (18, 23)]
    assert plan_shards(train, 10, workers=2) == shards  # enough shards for both workers
    ids = [i for s in shards for i in read_rows(train, *s).column("id").to_pylist()]
    assert ids == [f"r{i}" for i in range(23)]  # across row-group boundaries, in order
    with pytest.raises(ValueError, match="score_shard_rows"):
        plan_shards(train, 0)


def test_only_missing_shards_are_scored_and_stray_cuts_are_dropped(train, tmp_path):
    work = tmp_path / "work"
    shards = plan_shards(train, 10)
    assert missing_shards(work, shards) == shards
    raw = work / RAW
    pq.write_table(read_rows(train, 8, 16), raw / shard_name(8, 16))
    pq.write_table(read_rows(train, 0, 7), raw / shard_name(0, 7))  # another shard size
    (raw / f".{shard_name(0, 8)}.tmp-1").write_bytes(b"half")  # a killed writer's leftover
    assert missing_shards(work, shards) == [(0, 8), (16, 23)]
    assert sorted(p.name for p in raw.glob("*.parquet")) == [shard_name(8, 16)]
