"""Grouping queries by gradient similarity for query_batch_size > 1 (influence.query_grouping)."""

import pytest
import torch
from tiny_models import random_batch, slice_batch, tiny_model

from operators import query_grouping
from operators.capture import unit_gradients
from operators.curvature import capture_pass, fit_curvature
from operators.errors import UserError
from operators.query_grouping import query_sketches, similarity_order
from operators.scores import InfluenceConfig, grouping_order, precondition_queries, units_for


def test_groups_are_consecutive_runs_of_similar_queries():
    """Two directions interleaved (A B A B …): each group of 3 holds one direction only."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(32, generator=g, dtype=torch.float64), torch.randn(32, generator=g,
                                                                          dtype=torch.float64)
    rows = torch.stack([(a if i % 2 == 0 else b) + 0.1 * torch.randn(32, generator=g,
                                                                     dtype=torch.float64)
                        for i in range(12)])
    order = similarity_order(rows, 3)
    assert sorted(order) == list(range(12))
    groups = [order[i:i + 3] for i in range(0, 12, 3)]
    assert all(len({q % 2 for q in group}) == 1 for group in groups)


def test_no_grouping_below_two_queries_per_batch():
    rows = torch.randn(5, 4, dtype=torch.float64)
    assert similarity_order(rows, 1) == list(range(5))
    assert similarity_order(rows, 8) == list(range(5))  # one batch holds them all


def test_a_sketch_with_identity_projections_is_the_unit_gradient(monkeypatch):
    """Ω = I makes Ω_oᵀ DŴ Ω_i = DŴ: the sketch is formed from the same κ and Ds."""
    model = tiny_model("gpt2")
    units = units_for(model, InfluenceConfig())
    batch = random_batch(batch=3, seed=4)
    monkeypatch.setattr(query_grouping, "_omega",
                        lambda n, k, seed, dtype, device: torch.eye(n, dtype=dtype))
    sketches = query_sketches(model, units, [batch], k=0)
    grads = unit_gradients(capture_pass(model, units, batch, sampled=False), units,
                           batch["attention_mask"])
    expected = torch.cat([grads[u.name].flatten(1) for u in units], dim=1)
    torch.testing.assert_close(sketches, expected.double(), rtol=1e-10, atol=1e-12)


def test_sketch_inner_products_are_unbiased_estimates_of_the_gradients():
    """E⟨Ω_oᵀ G₁ Ω_i, Ω_oᵀ G₂ Ω_i⟩ = ⟨G₁, G₂⟩: averaged over 400 seeds (k = 8), within 10% of the
    largest inner product."""
    model = tiny_model("gpt2")
    units = units_for(model, InfluenceConfig())
    batch = random_batch(batch=3, seed=2)
    grads = unit_gradients(capture_pass(model, units, batch, sampled=False), units,
                           batch["attention_mask"])
    flat = torch.cat([grads[u.name].flatten(1) for u in units], dim=1).double()
    exact = flat @ flat.T
    sketched = [query_sketches(model, units, [batch], k=8, seed=s) for s in range(400)]
    mean = torch.stack([x @ x.T for x in sketched]).mean(dim=0)
    assert (mean - exact).abs().max() < 0.1 * exact.abs().max()


def test_queries_of_the_same_output_share_a_batch():
    """Two different samples, each repeated, interleaved (x y x y x y): with B = 3 every batch
    holds copies of one sample; file order would mix them."""
    model = tiny_model("gpt2")
    config = InfluenceConfig(query_batch_size=3, query_grouping="similarity")
    units = units_for(model, config)
    two = random_batch(batch=2, seed=9, ragged=False)
    queries = slice_batch(two, [0, 1, 0, 1, 0, 1])
    order = grouping_order(model, units, [queries], config)
    assert [i % 2 for i in order] in ([0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0])
    in_order = InfluenceConfig(query_batch_size=3, query_grouping="order")
    assert grouping_order(model, units, [queries], in_order) is None
    curv = fit_curvature(model, units, [random_batch(batch=6, seed=5)], fisher="empirical")
    grouped = precondition_queries(model, units, [slice_batch(queries, order)], config, curv)
    single = precondition_queries(model, units, [two], InfluenceConfig(), curv)
    for name in single:  # a batch of three copies is that copy's query
        torch.testing.assert_close(grouped[name], single[name][[order[0] % 2, order[3] % 2]])


def test_an_unknown_grouping_names_the_key():
    with pytest.raises(UserError, match="influence.query_grouping"):
        InfluenceConfig(query_grouping="kmeans")
