"""Ranking the raw score shards: streamed, every id once, the same at any record-batch size."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster import scoring
from operators.scores import aggregate


def write_raw(folder, shards, width=3, seed=0):
    """``shards`` raw files of random per-query-batch scores with a passthrough text column."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    ids = []
    for k, rows in enumerate(shards):
        names = [f"r{k}-{i}" for i in range(rows)]
        raw = rng.normal(size=(rows, width)) * np.array([1.0, 10.0, 0.1])[:width]
        flat = pa.array(raw.reshape(-1), type=pa.float64())
        table = pa.table({"id": names, "prompt": [f"p {n}" for n in names],
                          "response": ["x" * (i % 7) for i in range(rows)],
                          "note": list(range(rows)),
                          "raw": pa.FixedSizeListArray.from_arrays(flat, width)})
        pq.write_table(table, folder / f"{k}.parquet")
        ids += names
    return ids


@pytest.mark.parametrize("how", ["max", "mean"])
def test_streamed_ranking_equals_the_whole_table_ranking(tmp_path, monkeypatch, how):
    ids = write_raw(tmp_path / "raw", [7, 0, 12, 5])
    summary = scoring.finalize(tmp_path / "raw", tmp_path / "big", how)
    monkeypatch.setattr(scoring, "BATCH_ROWS", 2)
    scoring.finalize(tmp_path / "raw", tmp_path / "small", how)
    big = pq.read_table(tmp_path / "big").to_pandas().set_index("id")
    small = pq.read_table(tmp_path / "small").to_pandas().set_index("id")
    assert summary == {"rows": 24, "nonfinite_ids": [], "nonfinite": 0}
    assert sorted(big.index) == sorted(ids) and big.index.is_unique
    assert list(pq.read_table(tmp_path / "big").column_names[:3]) == ["id", "score", "rank"]
    assert {"prompt", "response", "note"} <= set(big.columns)  # passthrough
    np.testing.assert_array_equal(small.loc[big.index, "rank"], big["rank"])
    np.testing.assert_allclose(small.loc[big.index, "score"], big["score"], rtol=1e-12)
    # rank 1 is the highest score; ranks are a permutation of 1..N
    ordered = big.sort_values("rank")
    assert sorted(big["rank"]) == list(range(1, 25))
    assert (np.diff(ordered["score"].to_numpy()) <= 0).all()
    # the score is the scaled aggregate of the raw columns (scales: each column's std)
    raw = torch.from_numpy(np.stack(big["raw"].to_numpy()))
    np.testing.assert_allclose(big["score"], aggregate(raw, how).numpy(), rtol=1e-12)
    by_hand = raw / raw.std(dim=0)  # each column's unbiased std
    expect = by_hand.max(1).values if how == "max" else by_hand.mean(1)
    np.testing.assert_allclose(big["score"], expect.numpy(), rtol=1e-12)


def test_a_repeated_id_is_refused_and_nothing_is_published(tmp_path):
    write_raw(tmp_path / "raw", [4, 4])
    table = pq.read_table(tmp_path / "raw" / "0.parquet")
    pq.write_table(table, tmp_path / "raw" / "2.parquet")  # a retried block written twice
    with pytest.raises(RuntimeError, match="duplicate ids"):
        scoring.finalize(tmp_path / "raw", tmp_path / "ranked", "max")
    assert not (tmp_path / "ranked").exists()


def test_a_rerun_replaces_the_previous_ranking(tmp_path):
    write_raw(tmp_path / "raw", [5])
    scoring.finalize(tmp_path / "raw", tmp_path / "ranked", "max")
    (tmp_path / "ranked" / "stale.parquet").write_bytes(b"old")
    scoring.finalize(tmp_path / "raw", tmp_path / "ranked", "max")
    assert sorted(p.name for p in (tmp_path / "ranked").iterdir()) == ["part-00000.parquet"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
