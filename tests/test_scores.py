"""Score invariances and the shared interface of every method."""

import pytest
import torch
from tiny_models import random_batch, slice_batch, tiny_model

from operators.curvature import fit_curvature
from operators.methods import METHODS
from operators.scores import (
    InfluenceConfig,
    aggregate,
    precondition_queries,
    query_batches,
    score_batch,
    units_for,
)


def setup(method, family="gpt2"):
    config = InfluenceConfig(method=method, fisher="empirical", query_batch_size=2)
    model = tiny_model(family)
    units = units_for(model, config)
    curv = (fit_curvature(model, units, [random_batch(batch=6, seed=5)], fisher="empirical",
                          corrected=config.kind.eigen_correction) if config.uses_curvature else None)
    queries = precondition_queries(model, units, [random_batch(batch=3, seed=9)], config, curv)
    return model, units, config, queries


@pytest.mark.parametrize("method", METHODS)
def test_scores_do_not_depend_on_the_training_batch_size(method):
    model, units, config, queries = setup(method)
    batch = random_batch(batch=6, seed=1)
    together = score_batch(model, units, batch, queries, config)
    assert together.shape == (6, 2)  # 3 queries in batches of 2
    for row in range(6):
        alone = score_batch(model, units, slice_batch(batch, [row]), queries, config)
        torch.testing.assert_close(alone[0], together[row], rtol=1e-8, atol=1e-12)


def test_query_batches_average_before_preconditioning():
    model, units, config, _ = setup("linfac")
    curv = fit_curvature(model, units, [random_batch(batch=6, seed=5)], fisher="empirical")
    qb = random_batch(batch=4, seed=9)
    single = precondition_queries(model, units, [qb], InfluenceConfig(
        fisher="empirical", query_batch_size=1), curv)
    batched = precondition_queries(model, units, [qb], InfluenceConfig(
        fisher="empirical", query_batch_size=4), curv)
    for name in single:  # the IHVP is linear: mean of IHVPs = IHVP of the mean
        torch.testing.assert_close(batched[name][0], single[name].mean(dim=0))


def test_aggregate_scales_each_query_batch_and_keeps_signs():
    raw = torch.tensor([[1.0, 100.0], [-2.0, -300.0], [0.5, 50.0]], dtype=torch.float64)
    agg = aggregate(raw, "max")
    assert agg[1] < 0 < agg[0]
    assert aggregate(raw, "mean").shape == (3,)
    assert query_batches(5, 2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("bad", [dict(method="lissa"), dict(query_batch_size=0),
                                 dict(aggregate="sum"), dict(fisher="mc")])
def test_bad_influence_config_names_the_key(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"influence.{key}"):
        InfluenceConfig(**bad)
