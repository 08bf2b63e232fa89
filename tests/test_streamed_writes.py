"""Prepared data is written chunk by chunk: same file as a whole write, types unified, atomic."""

import json

import pyarrow.parquet as pq
import pytest

from cluster.dataio import DataError, iter_validated, write_parquet_atomic


def rows(n):
    """Rows whose optional columns appear late (null, then typed) or only in some rows."""
    return [{"id": f"r{i}", "prompt": f"p{i}", "response": "r",
             "source": None if i < 5 else f"s{i}", **({"late": i} if i >= 7 else {})}
            for i in range(n)]


@pytest.mark.parametrize("chunk", [1, 3, 4096])
def test_chunked_write_keeps_every_row_and_column(tmp_path, chunk):
    count = write_parquet_atomic(iter(rows(12)), tmp_path / "t.parquet", chunk_rows=chunk)
    table = pq.read_table(tmp_path / "t.parquet")
    assert count == table.num_rows == 12
    assert table.column_names == ["id", "prompt", "response", "source", "late"]
    assert table.to_pylist() == [{**r, "late": r.get("late")} for r in rows(12)]
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # no parts, no temp file


@pytest.mark.parametrize("chunk", [2, 100])
def test_a_column_that_mixes_types_is_named_and_nothing_is_written(tmp_path, chunk):
    bad = [{"id": "1", "n": 1}, {"id": "2", "n": 2}, {"id": "3", "n": "three"}]
    with pytest.raises(DataError, match=r"t\.parquet: .*(column 'n'|Field n)"):
        write_parquet_atomic(bad, tmp_path / "t.parquet", chunk_rows=chunk)
    assert list(tmp_path.iterdir()) == []


def test_validation_streams_and_a_late_bad_row_stops_the_write(tmp_path):
    path = tmp_path / "train.jsonl"
    good = [{"id": f"g{i}", "prompt": "p", "response": "r"} for i in range(50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good + [{"id": "x", "prompt": "p"}]))
    stream = iter_validated(str(path))
    assert next(stream)["id"] == "g0"  # rows come out before the file is read to its end
    with pytest.raises(DataError, match=r"train\.jsonl, line 51, column 'response': missing"):
        write_parquet_atomic(iter_validated(str(path)), tmp_path / "out.parquet", chunk_rows=8)
    assert not (tmp_path / "out.parquet").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.jsonl"]
