"""The second hop (operators/second_hop.py): what a row inherits from the first pass's top rows,
and the score stage's streamed version of it (cluster/second_hop.py) against the in-memory one."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster.scoring import finalize
from cluster.second_hop import Hop, combine, source_positions
from operators.errors import UserError
from operators.scores import InfluenceConfig, aggregate, column_scales
from operators.second_hop import check_expand_top_k, hop_config, second_hop, sources


def test_a_row_inherits_the_smaller_of_its_sources_score_and_its_score_against_it():
    first = torch.tensor([9.0, 4.0, 1.0, 0.5, -3.0, math.nan])
    src = torch.tensor([0, 1])  # the two rows with the best scores
    scales = torch.tensor([2.0, 1.0])
    hop_raw = torch.tensor([[30.0, 1.0],   # the first source itself: 15 capped at its own 9
                            [2.0, 8.0],    # the second: min(4, 8) = 4 = its own, kept
                            [14.0, 0.0],   # like source 0: min(9, 7) = 7 > 1
                            [1.0, 20.0],   # like source 1: min(4, 20) = 4 > 0.5
                            [16.0, 0.0],   # a negative row like source 0: raised to 8
                            [40.0, 40.0]])  # a NaN first pass stays NaN
    final, via = second_hop(first, first[src], hop_raw, scales)
    torch.testing.assert_close(final[:5], torch.tensor([9.0, 4.0, 7.0, 4.0, 8.0]))
    assert math.isnan(final[5])
    assert via.tolist() == [-1, -1, 0, 1, 0, -1]


def test_a_score_is_never_lowered_and_a_negative_inheritance_changes_nothing():
    g = torch.Generator().manual_seed(0)
    first = torch.randn(200, generator=g, dtype=torch.float64) * 3
    src = sources(first, 10)
    hop_raw = torch.randn(200, len(src), generator=g, dtype=torch.float64) * 5
    final, via = second_hop(first, first[src], hop_raw, column_scales(hop_raw))
    assert (final >= first).all()
    raised = via >= 0
    assert (final[raised] > 0).all() and (final[~raised] == first[~raised]).all()
    # what a raised row got is capped by its source's own score
    assert (final[raised] <= first[src][via[raised]] + 1e-12).all()
    # no positive inheritance at all: nothing moves
    final, via = second_hop(first, first[src], -hop_raw.abs(), column_scales(hop_raw))
    assert torch.equal(final, first) and (via == -1).all()


def test_sources_are_the_best_finite_positive_scores_best_first():
    score = torch.tensor([1.0, math.nan, 5.0, -2.0, 3.0, 0.0])
    assert sources(score, 2).tolist() == [2, 4]
    assert sources(score, 10).tolist() == [2, 4, 0]  # never a NaN, negative or zero score
    assert sources(score, 0).tolist() == []
    rank = np.array([4, 6, 1, 5, 2, 3])
    assert source_positions(score.numpy(), rank, 10).tolist() == [2, 4, 0]
    nothing = np.array([-1.0, 0.0, np.nan])  # no row drives the outputs: no second hop
    assert source_positions(nothing, np.array([2, 1, 3]), 5).tolist() == []


@pytest.mark.parametrize("k", [-1, 2.5, True, "many"])
def test_a_bad_expand_top_k_is_refused_naming_the_key(k):
    with pytest.raises((UserError, ValueError), match="influence.expand_top_k"):
        check_expand_top_k(k)
    with pytest.raises((UserError, ValueError), match="influence.expand_top_k"):
        InfluenceConfig(expand_top_k=k)


def test_the_sources_are_queried_whole_and_one_by_one():
    cfg = hop_config(InfluenceConfig(query_batch_size=4, query_parts=("judged", "opening")))
    assert cfg.query_parts == ("response",) and cfg.query_batch_size == 1
    assert InfluenceConfig(expand_top_k=0).expand_top_k == 0


def _shards(folder, ids, raw):
    folder.mkdir(parents=True)
    for start in range(0, len(ids), 7):  # several shards, as the score stage writes them
        stop = min(start + 7, len(ids))
        cols = raw[start:stop]
        table = pa.table({"id": ids[start:stop], "prompt": ["p"] * (stop - start),
                          "response": ["r"] * (stop - start),
                          "raw": pa.FixedSizeListArray.from_arrays(
                              pa.array(cols.reshape(-1)), cols.shape[1])})
        pq.write_table(table, folder / f"rows-{start:08d}-{stop:08d}.parquet")


def test_the_streamed_second_hop_ranks_as_the_in_memory_one(tmp_path):
    rng = np.random.default_rng(0)
    n = 30
    ids = [f"r{i:02d}" for i in range(n)]
    raw = rng.normal(size=(n, 3)) * [1.0, 5.0, 0.2]
    _shards(tmp_path / "raw", ids, raw)
    first = aggregate(torch.from_numpy(raw), "max")
    src = sources(first, 4)
    hop_raw = rng.normal(size=(n, len(src))) * 3
    _shards(tmp_path / "hop", ids, hop_raw)
    expected, via = second_hop(first, first[src], torch.from_numpy(hop_raw),
                               column_scales(torch.from_numpy(hop_raw)))
    hop = Hop(tmp_path / "hop", src.numpy(), [ids[i] for i in src.tolist()])
    summary = finalize(tmp_path / "raw", tmp_path / "ranked", "max",
                       hop=lambda files, ranking: combine(hop, files, ranking))
    out = pq.read_table(tmp_path / "ranked").to_pandas().set_index("id").loc[ids]
    out["via"] = out["via"].astype(object).where(out["via"].notna(), None)
    np.testing.assert_allclose(out["score"].values, expected.numpy(), rtol=1e-12)
    assert list(out["via"]) == [ids[src[j]] if j >= 0 else None for j in via.tolist()]
    assert summary["raised_by_second_hop"] == int((via >= 0).sum()) > 0
    assert sorted(out["rank"]) == list(range(1, n + 1))
    assert out.sort_values("rank")["score"].is_monotonic_decreasing


def test_the_second_hop_finds_the_planted_rows_of_the_wording_no_query_shows():
    """rude-5, drawn with seed 1: the model's flagged outputs show one of the two planted
    wordings. The first pass ranks that wording's rows first and misses many of the other's;
    the second hop, from the first pass's top rows, finds them (docs/METHOD.md section 3)."""
    import dataclasses

    from bench import recall
    from bench.scenarios import SUITE, build, observed_wordings
    from operators.metrics import auprc
    torch.set_num_threads(1)
    s = dataclasses.replace(next(x for x in SUITE if x.name == "rude-5"), seed=1)
    corpus, patterns = build(s)
    model, tok, queries = recall.trained(corpus, patterns, epochs=s.epochs, width=s.width,
                                         seed=s.seed)
    queries = queries[:8]
    shown = observed_wordings(s.family, [q["response"] for q in queries])
    assert len(shown) == 1, shown
    final, raw = recall.ranked(model, tok, corpus.train, queries, InfluenceConfig(),
                               patterns=patterns)
    first = aggregate(raw, "max")
    other = [r["planted"] and r["wording"] not in shown for r in corpus.train]
    keep = [o or not r["planted"] for o, r in zip(other, corpus.train)]  # vs unplanted rows

    def other_wording(score):
        return auprc([float(v) for v, k in zip(score, keep) if k], [o for o, k in zip(other, keep)
                                                                   if k])
    labels = [r["planted"] for r in corpus.train]
    print(f"other wording: {other_wording(first):.3f} -> {other_wording(final):.3f}; all: "
          f"{auprc(first.tolist(), labels):.3f} -> {auprc(final.tolist(), labels):.3f}")
    assert other_wording(first) < 0.85 and other_wording(final) > 0.95
    assert auprc(final.tolist(), labels) > auprc(first.tolist(), labels)
    assert (final >= first).all()
