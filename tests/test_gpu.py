"""The GPU tier: the operators, a one-worker NCCL fit, scoring and an IBO step on CUDA.

Every test here is marked ``gpu``; without a CUDA device each skips with the reason (CI has
none). CUDA results are compared with the same computation on the CPU.
"""

import pytest
import torch
from tiny_models import random_batch, tiny_model

from operators.curvature import fit_curvature
from operators.scores import InfluenceConfig, precondition_queries, score_batch, units_for

pytestmark = pytest.mark.gpu


def to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def scores_on(device, method, fisher, dtype=torch.float64, rank=None):
    model = tiny_model("llama", dtype=dtype).to(device)
    config = InfluenceConfig(method=method, fisher=fisher, query_batch_size=2, query_rank=rank)
    units = units_for(model, config)
    train = [to(random_batch(batch=8, seed=s, length=12), device) for s in (5, 6)]
    curv = fit_curvature(model, units, train, corrected=method != "kfac", fisher=fisher,
                         logodds_cap=config.logodds_cap)
    queries = precondition_queries(model, units, [to(random_batch(batch=3, seed=9), device)],
                                   config, curv)
    assert all(v.device.type == torch.device(device).type for v in queries.values())
    return torch.cat([score_batch(model, units, b, queries, config) for b in train]).cpu()


@pytest.mark.parametrize("method", ["linfac", "ekfac", "kfac"])
@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_cuda_scores_equal_cpu_scores(method, fisher):
    cpu, cuda = scores_on("cpu", method, fisher), scores_on("cuda", method, fisher)
    torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-8)


def test_bf16_on_cuda_ranks_like_fp32():
    from scipy.stats import spearmanr
    full = scores_on("cuda", "linfac", "empirical", torch.float32)
    half = scores_on("cuda", "linfac", "empirical", torch.bfloat16)
    for col in range(full.shape[1]):
        assert spearmanr(full[:, col], half[:, col]).statistic >= 0.99


def test_low_rank_queries_on_cuda_equal_full_rank():
    torch.testing.assert_close(scores_on("cuda", "linfac", "empirical", rank=17),
                               scores_on("cuda", "linfac", "empirical"), rtol=1e-6, atol=1e-9)


@pytest.mark.ray
def test_one_worker_nccl_fit_score_and_an_ibo_step(tmp_path):
    import ray
    from demo_assets import save_demo_model

    from cluster.batches import TokenizeConfig
    from cluster.datasets import read_prepared
    from cluster.factor_job import FactorSpec, fit_factors, load_curvature
    from cluster.ibo_job import IBOSpec, run_ibo
    from cluster.ibo_objectives import ObjectiveConfig, get_objective
    from cluster.runtime import ClusterConfig
    from cluster.scoring import ScoreSpec, finalize, precondition_on_worker, score_corpus
    from cluster.selection_io import write_selection
    from operators.selection import SelectionConfig
    from pipeline.specs import PROJECT

    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
             log_to_driver=False)
    try:
        corpus, model_dir, train = save_demo_model(tmp_path, epochs=6, width=64)
        cluster = ClusterConfig(num_workers=1, cpus_per_worker=1, gpus_per_worker=1, batch_size=8)
        tokens = TokenizeConfig(max_length=64)
        fit_factors(read_prepared(train, cluster), FactorSpec(str(model_dir), dtype="bfloat16",
                    tokenize=tokens), cluster, tmp_path / "factors", tmp_path / "ray")
        curvature, _ = load_curvature(tmp_path / "factors")
        assert all(torch.isfinite(v).all() for v in curvature.lambdas.values())
        spec = ScoreSpec(str(model_dir), dtype="bfloat16", tokenize=tokens,
                         influence=InfluenceConfig(query_rank=8))
        queries = [r for r in corpus.train if r["planted"]][:4]
        feats = precondition_on_worker(spec, queries, tmp_path / "factors", cluster)
        score_corpus(read_prepared(train, cluster), spec, feats, cluster, tmp_path / "raw")
        assert finalize(tmp_path / "raw", tmp_path / "ranked", "max")["nonfinite"] == 0
        write_selection(tmp_path / "ranked", SelectionConfig(), tmp_path / "scores",
                        tmp_path / "select", "planted")
        ibo = IBOSpec(model_path=str(model_dir), steps=1, checkpoint_every=1, dtype="bfloat16",
                      deepspeed_config=str(PROJECT / "conf/deepspeed/zero0.json"),
                      objective=ObjectiveConfig(tokenize=tokens))
        data = {n: read_prepared(tmp_path / "select" / f"{n}.parquet", cluster)
                for n in get_objective("ibo").datasets}
        metrics = run_ibo(data, ibo, cluster, tmp_path / "ibo", tmp_path / "ray")
        assert metrics["step"] == 1 and (tmp_path / "ibo" / "model").is_dir()
    finally:
        ray.shutdown()
