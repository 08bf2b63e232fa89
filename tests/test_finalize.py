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
    assert summary == {"rows": 24, "nonfinite_ids": [], "nonfinite": 0, "query_batches": 3,
                       "raised_by_second_hop": 0}
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
    # the inhibition the negative set is built on: the most negative column (max), the score (mean)
    inhibits = by_hand.min(1).values if how == "max" else by_hand.mean(1)
    np.testing.assert_allclose(big["inhibition"], inhibits.numpy(), rtol=1e-12)
    np.testing.assert_allclose(small.loc[big.index, "inhibition"], big["inhibition"], rtol=1e-12)


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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from demo_assets import save_demo_model
    return save_demo_model(tmp_path_factory.mktemp("demo"), epochs=2)


def scored_in_process(demo, folder, how):
    """What the score stage holds before ranking, without Ray: LinFAC query features and raw
    shards as the scorers write them (``id``, text, ``n_tokens``, ``raw``)."""
    from cluster.batches import TokenizeConfig, iter_row_batches, to_tensors
    from cluster.scoring import ScoreSpec, model_and_units
    from operators.curvature import fit_curvature
    from operators.scores import InfluenceConfig, precondition_queries, score_batch
    corpus, model_dir, _ = demo
    spec = ScoreSpec(model_path=str(model_dir), dtype="float64", tokenize=TokenizeConfig(64),
                     influence=InfluenceConfig(query_batch_size=2, aggregate=how))
    model, tok, units = model_and_units(spec)
    batches = [to_tensors(c, tok, spec.tokenize) for c in iter_row_batches(corpus.train, 32)]
    curvature = fit_curvature(model, units, batches, corrected=True,
                              logodds_cap=spec.influence.logodds_cap)
    queries = [r for r in corpus.train if r["planted"]][:5]
    features = precondition_queries(model, units, (to_tensors(c, tok, spec.tokenize) for c in
                                                   iter_row_batches(queries, 4)),
                                    spec.influence, curvature)
    folder.mkdir()
    for k, start in enumerate(range(0, len(corpus.train), 100)):  # three shards, batches of 32
        rows = corpus.train[start:start + 100]
        raw = torch.cat([score_batch(model, units, to_tensors(c, tok, spec.tokenize), features,
                                     spec.influence) for c in iter_row_batches(rows, 32)])
        flat = pa.array(raw.numpy().reshape(-1), type=pa.float64())
        table = pa.Table.from_pylist(rows).append_column("n_tokens", pa.array([1] * len(rows)))
        table = table.append_column("raw", pa.FixedSizeListArray.from_arrays(flat, raw.shape[1]))
        pq.write_table(table, folder / f"{k}.parquet")
    return spec, features, [u.name for u in units]


@pytest.mark.parametrize("how", ["max", "mean"])
def test_the_top_rows_get_their_unit_shares_and_they_add_up_to_the_ranked_score(
        demo, tmp_path, how):
    from cluster.attribution import DEPENDENCE, attribute, attribution_step, units_of
    from cluster.selection_io import write_selection
    from operators.selection import SelectionConfig
    spec, features, names = scored_in_process(demo, tmp_path / "raw", how)
    terms_seen = {}

    contrast_ids = []

    def rescore(rows, contrast, scales):  # in process here; a Ray task on one worker in the stage
        found = attribute(spec, features, rows, scales, how, batch_size=7, contrast=contrast)
        terms_seen.update(zip(rows.column("id").to_pylist(), found.terms))
        contrast_ids.extend(contrast.column("id").to_pylist())
        return found

    summary = scoring.finalize(tmp_path / "raw", tmp_path / "ranked", how,
                               attribution_step(tmp_path / "raw", 20, 50, rescore))
    ranked = pq.read_table(tmp_path / "ranked")
    assert units_of(ranked.schema) == names == ["transformer.h.0.attn", "transformer.h.0.mlp",
                                                "transformer.h.1.attn", "transformer.h.1.mlp"]
    table = ranked.to_pandas().set_index("id").sort_values("rank")
    top, rest = table.iloc[:20], table.iloc[20:]
    assert rest["unit_shares"].isna().all() and top["unit_shares"].notna().all()
    shares = np.stack(top["unit_shares"].to_numpy())
    np.testing.assert_allclose(shares.sum(1), 1.0, rtol=1e-5)  # float32 column
    # re-scored in other batches (7 rows, other padding), the units add up to the ranked score
    totals = np.array([terms_seen[i].sum() for i in top.index])
    np.testing.assert_allclose(totals, top["score"], rtol=1e-10)
    assert summary["attribution/rows"] == 20 and summary["attribution/score_rel_gap"] < 1e-10
    # the dependence: 50 ordinary rows from outside the top, a percentile per row and sublayer
    assert len(set(contrast_ids)) == 50 and not set(contrast_ids) & set(top.index)
    assert units_of(ranked.schema, DEPENDENCE) == names  # linfac's units are the sublayers
    assert rest[DEPENDENCE].isna().all()
    dependence = np.stack(top[DEPENDENCE].to_numpy())
    assert dependence.shape == (20, 4) and ((0 <= dependence) & (dependence <= 1)).all()
    assert summary["attribution/dependence_rows"] == 20
    assert summary["attribution/contrast_rows"] == 50
    # the column and its unit names reach the contract's scores/ through the select stage
    write_selection(tmp_path / "ranked", SelectionConfig(), tmp_path / "scores",
                    tmp_path / "select")
    scores = pq.read_table(tmp_path / "scores" / "scores.parquet")
    assert units_of(scores.schema) == names
    assert scores.column("unit_shares").null_count == scores.num_rows - 20
    # ... and the report's plot, table and metrics: each layer's mean attn and mlp share
    from pipeline.artifacts import Selection
    from pipeline.stages import report
    (tmp_path / "report").mkdir()
    metrics = report._attribution(Selection(tmp_path / "scores"), tmp_path / "report")
    mean = shares.astype(np.float64).mean(0)
    relied = (dependence > 0.95).mean(0)  # float32 percentiles: none sits at 0.95 exactly here
    parts = [f"layer{i}_{p}" for i in (0, 1) for p in ("attn", "mlp")]
    assert metrics == pytest.approx({**{f"attribution/{k}": v for k, v in zip(parts, mean)},
                                     **{f"dependence/{k}": v for k, v in zip(parts, relied)}},
                                    rel=1e-6)
    assert sum(v for k, v in metrics.items() if k.startswith("attribution/")) == pytest.approx(
        1.0, rel=1e-5)
    assert (tmp_path / "report" / "layer_attribution.png").stat().st_size > 1000
    csv = (tmp_path / "report" / "layer_attribution.csv").read_text().splitlines()
    assert csv[0] == "layer,attn,mlp,attn_reliance,mlp_reliance" and len(csv) == 3
