"""Low-rank queries, streamed query batches, and both scoring paths against full rank (float64)."""

import pytest
import torch
from tiny_models import random_batch, slice_batch, tiny_model

from operators.curvature import fit_curvature
from operators.lowrank import compress, formed_scores, lowrank_scores
from operators.scores import LOW_U, InfluenceConfig, precondition_queries, score_batch, units_for


def fitted(method="linfac", family="llama"):
    model = tiny_model(family)
    config = InfluenceConfig(method=method, fisher="empirical")
    units = units_for(model, config)
    curv = fit_curvature(model, units, [random_batch(batch=6, seed=5)], fisher="empirical",
                         corrected=method != "kfac")
    return model, units, curv


@pytest.mark.parametrize("method,similarity", [("linfac", "dot"), ("ekfac", "dot"),
                                               ("gradsim", "cosine")])
def test_low_rank_at_full_rank_equals_full_rank_scores(method, similarity):
    model, units, curv = fitted(method)
    curv = curv if method != "gradsim" else None
    full_rank = max(min(u.shape) for u in units)
    configs = [InfluenceConfig(method=method, similarity=similarity, fisher="empirical",
                               query_batch_size=2, query_rank=rank)
               for rank in (None, full_rank)]
    queries = [precondition_queries(model, units, [random_batch(batch=5, seed=9)], c, curv)
               for c in configs]
    assert any(k.endswith(LOW_U) for k in queries[1])
    batch = random_batch(batch=4, seed=1)
    want, got = (score_batch(model, units, batch, q, c) for q, c in zip(queries, configs))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)


def test_token_path_equals_formed_gradient_path():
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    kappa = torch.randn(3, 7, 6, generator=g, dtype=torch.float64)
    u = torch.randn(4, 5, 2, generator=g, dtype=torch.float64)
    v = torch.randn(4, 6, 2, generator=g, dtype=torch.float64)
    formed = torch.einsum("bto,bti->boi", grad, kappa)
    dense = torch.einsum("gor,gir->goi", u, v)
    want = formed.flatten(1) @ dense.flatten(1).T
    torch.testing.assert_close(lowrank_scores(grad, kappa, u, v), want)
    torch.testing.assert_close(formed_scores(formed, u, v), want)


def test_randomized_compression_keeps_the_top_directions():
    g = torch.Generator().manual_seed(1)
    left = torch.randn(64, 4, generator=g, dtype=torch.float64)
    right = torch.randn(48, 4, generator=g, dtype=torch.float64)
    matrix = left @ right.T + 1e-6 * torch.randn(64, 48, generator=g, dtype=torch.float64)
    u, v = compress(matrix, 4)
    assert u.shape == (64, 4) and v.shape == (48, 4)
    assert (u @ v.T - matrix).norm() / matrix.norm() < 1e-5


def test_streamed_query_batches_do_not_depend_on_the_loader_batches():
    model, units, curv = fitted()
    config = InfluenceConfig(fisher="empirical", query_batch_size=3)
    rows = random_batch(batch=7, seed=9)
    whole = precondition_queries(model, units, [rows], config, curv)
    pieces = [slice_batch(rows, idx) for idx in ([0, 1], [2, 3, 4, 5], [6])]
    streamed = precondition_queries(model, units, pieces, config, curv)
    assert next(iter(whole.values())).shape[0] == 3  # 7 queries in batches of 3
    for name, value in whole.items():
        torch.testing.assert_close(streamed[name], value, rtol=1e-9, atol=1e-12)


def test_bfloat16_scores_rank_like_float32():
    from scipy.stats import spearmanr
    model, units, _ = fitted(family="gpt2")
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        curv = fit_curvature(m, units, [random_batch(batch=16, seed=5, length=12)],
                             fisher="empirical")
        config = InfluenceConfig(fisher="empirical", query_batch_size=1)
        q = precondition_queries(m, units, [random_batch(batch=2, seed=9)], config, curv)
        raw = score_batch(m, units, random_batch(batch=16, seed=3, length=12), q, config)
        assert raw.dtype == torch.float64 and q[units[0].name].dtype == torch.float32
        results.append(raw)
    for col in range(results[0].shape[1]):
        rho = spearmanr(results[0][:, col], results[1][:, col]).statistic
        assert rho >= 0.99, rho
