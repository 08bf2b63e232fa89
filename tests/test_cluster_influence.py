"""Distributed factor fitting and scoring on a real local Ray (2 CPUs)."""

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from demo_assets import save_demo_model
from in_process import influence_in_process

from cluster.batches import TokenizeConfig
from cluster.datasets import read_prepared
from cluster.factor_job import FactorSpec, fit_factors, load_curvature
from cluster.progress import Progress
from cluster.runtime import ClusterConfig
from cluster.scoring import (
    ScoreSpec,
    finalize,
    precondition_on_worker,
    score_corpus,
)
from operators.scores import InfluenceConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_demo_model(tmp_path_factory.mktemp("demo"))


def cluster_of(n):
    return ClusterConfig(num_workers=n, cpus_per_worker=0.5, batch_size=16)


def fit(ray, assets, n, root, progress=None):
    corpus, model_dir, train = assets
    spec = FactorSpec(model_path=str(model_dir), dtype="float64",
                      tokenize=TokenizeConfig(max_length=64))
    metrics = fit_factors(read_prepared(train, cluster_of(n)), spec, cluster_of(n),
                          root / "factors", root / "ray", progress=progress)
    return metrics, load_curvature(root / "factors")[0]


def live(label, total, lines):
    """A progress display that logs every poll (no terminal in tests)."""
    return Progress(label, total, lines.append, every_s=0.0, poll_s=0.05, tty=False)


def in_process(assets):
    """The same fit in this process, no Ray: per-sample seeds make it the one-worker reference."""
    from cluster.batches import iter_row_batches, to_tensors
    from cluster.model_io import load_model, load_tokenizer
    from operators.curvature import DEFAULT_LOGODDS_CAP, fit_curvature
    from operators.units import discover_units
    corpus, model_dir, _ = assets
    model, tok = load_model(model_dir, "float64"), load_tokenizer(model_dir)
    batches = [to_tensors(c, tok, TokenizeConfig(max_length=64))
               for c in iter_row_batches(corpus.train, 16)]
    return fit_curvature(model, discover_units(model, "linfac"), batches,
                         logodds_cap=DEFAULT_LOGODDS_CAP)  # FactorSpec's


def test_two_workers_fit_the_same_factors_and_scores_as_one(ray_local, assets, tmp_path):
    rows, lines = len(assets[0].train), []
    one = in_process(assets)
    with live("fit_factors", 2 * rows, lines) as progress:
        m2, two = fit(ray_local, assets, 2, tmp_path / "w2", progress.counter)
    assert m2["sequences"] == rows
    assert progress.done[0] == 2 * rows  # both passes, both workers, every row once each
    assert any(f"/{2 * rows} sequences" in line and "seq/s" in line for line in lines)
    for name in one.eigens:
        torch.testing.assert_close(two.lambdas[name], one.lambdas[name], rtol=1e-6, atol=1e-12)
        a1, a2 = one.eigens[name].a, two.eigens[name].a
        torch.testing.assert_close(a2, a1, rtol=1e-6, atol=1e-10)

    corpus, model_dir, train = assets
    spec = ScoreSpec(model_path=str(model_dir), dtype="float64",
                     influence=InfluenceConfig(query_batch_size=2),
                     tokenize=TokenizeConfig(max_length=64))
    queries = [r for r in corpus.train if r["planted"]][:5]
    root = tmp_path / "w2"
    feats = precondition_on_worker(spec, queries, root / "factors", cluster_of(2))  # a task
    with live("score", rows, lines) as progress:
        score_corpus(read_prepared(train, cluster_of(2)), spec, feats, cluster_of(2),
                     root / "raw", progress.counter)
    assert progress.done[0] == rows
    finalize(root / "raw", root / "ranked", "max")
    s2 = pq.read_table(root / "ranked").to_pandas().set_index("id")
    _, one_score = influence_in_process(spec, corpus.train, queries)  # the one-worker reference
    s1 = pd.Series(one_score.numpy(), index=[r["id"] for r in corpus.train])
    assert sorted(s2.index) == sorted(s1.index)  # every id exactly once
    assert s2.index.is_unique
    assert {"prompt", "response", "topic", "planted"} <= set(s2.columns)  # passthrough
    torch.testing.assert_close(torch.tensor(s2.loc[s1.index, "score"].values),
                               torch.tensor(s1.values), rtol=1e-6, atol=1e-9)
    top = s2.sort_values("rank").head(20)
    assert top["planted"].mean() > 0.8
