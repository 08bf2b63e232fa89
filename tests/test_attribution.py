"""Per-sublayer attribution (operators/attribution.py): exact per-unit terms and their shares."""

import math

import pytest
import torch
from tiny_models import FAMILIES, random_batch, tiny_model

from operators.attribution import (
    contributions,
    group_shares,
    mean_group_shares,
    unit_shares,
    unit_total,
)
from operators.curvature import fit_curvature
from operators.scores import (
    InfluenceConfig,
    aggregate,
    precondition_queries,
    score_batch,
    unit_scores,
    units_for,
)
from operators.units import discover_units, sublayer_of

CASES = [dict(method="linfac"), dict(method="ekfac"), dict(method="kfac"),
         dict(method="gradsim"), dict(method="linfac", query_rank=2),
         dict(method="gradsim", similarity="cosine")]


def scored(family="gpt2", **kw):
    """(per-unit scores, score_batch's scores, unit names) of a random batch, 3 queries."""
    config = InfluenceConfig(fisher="empirical", query_batch_size=2, **kw)
    model = tiny_model(family)
    units = units_for(model, config)
    curv = (fit_curvature(model, units, [random_batch(batch=6, seed=5)], fisher="empirical",
                          corrected=config.kind.eigen_correction)
            if config.uses_curvature else None)
    queries = precondition_queries(model, units, [random_batch(batch=3, seed=9)], config, curv)
    batch = random_batch(batch=5, seed=1)
    return (unit_scores(model, units, batch, queries, config),
            score_batch(model, units, batch, queries, config), [u.name for u in units])


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_per_unit_scores_add_up_to_the_score(case):
    per_unit, total, names = scored(**case)
    assert per_unit.shape == (5, 2, len(names)) and per_unit.dtype == torch.float64
    if case.get("similarity") == "cosine":  # each term divided by the row's norm: rounding
        torch.testing.assert_close(unit_total(per_unit), total, rtol=1e-12, atol=1e-15)
    else:  # the same terms added in the same order: bit for bit
        assert torch.equal(unit_total(per_unit), total)
    torch.testing.assert_close(per_unit.sum(-1), total, rtol=1e-12, atol=1e-15)


def test_a_method_without_units_has_no_per_unit_scores():
    config = InfluenceConfig(method="repsim")
    model = tiny_model()
    queries = precondition_queries(model, [], [random_batch(batch=2, seed=9)], config, None)
    with pytest.raises(ValueError, match="influence.method=repsim"):
        unit_scores(model, [], random_batch(batch=2), queries, config)


@pytest.mark.parametrize("how", ["max", "mean"])
def test_unit_terms_add_up_to_the_aggregated_score_and_shares_to_one(how):
    per_unit, total, names = scored()
    scales = torch.tensor([0.5, 3.0], dtype=torch.float64)
    terms = contributions(per_unit, how, scales)
    torch.testing.assert_close(terms.sum(1), aggregate(total, how, scales), rtol=1e-12,
                               atol=1e-15)
    shares = unit_shares(terms)
    torch.testing.assert_close(shares.sum(1), torch.ones(5, dtype=torch.float64))
    # without scales, the per-unit scores' own column scales, as aggregate computes them
    torch.testing.assert_close(contributions(per_unit, how).sum(1), aggregate(total, how))


def test_max_takes_the_terms_of_the_winning_scaled_column():
    # column 0 wins on its raw total, column 1 once scaled
    per_unit = torch.tensor([[[3.0, 1.0], [1.0, 1.5]]], dtype=torch.float64)
    assert contributions(per_unit, "max", torch.ones(2)).tolist() == [[3.0, 1.0]]
    assert contributions(per_unit, "max", torch.tensor([4.0, 1.0])).tolist() == [[1.0, 1.5]]
    assert contributions(per_unit, "mean", torch.ones(2)).tolist() == [[2.0, 1.25]]


def test_shares_are_signed_and_undefined_when_the_units_cancel():
    terms = torch.tensor([[3.0, -1.0],  # a positive score, one unit against it
                          [-2.0, -2.0],  # a negative score: both carry half of it
                          [1.0, -1.0],  # the units cancel
                          [math.nan, 1.0]], dtype=torch.float64)
    shares = unit_shares(terms)
    assert shares[0].tolist() == [1.5, -0.5]
    assert shares[1].tolist() == [0.5, 0.5]
    assert torch.isnan(shares[2:]).all()
    nan_row = contributions(torch.tensor([[[math.nan, 1.0]]]), "max", torch.ones(1))
    assert torch.isnan(nan_row).all()


def test_sublayer_names_of_every_family_map_to_their_layer_and_part():
    for family in FAMILIES:
        model = tiny_model(family, layers=2)
        for method in ("linfac", "ekfac"):
            groups = {sublayer_of(u.name) for u in discover_units(model, method)}
            assert groups == {(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")}, (family, method)
    assert sublayer_of("model.layers.3.mlp.experts.5.w1") == (3, "mlp")
    assert sublayer_of("base_model.model.transformer.h.1.attn.c_attn.lora_A.default") == (
        1, "attn")
    assert sublayer_of("lm_head") == (-1, "lm_head")


def test_linear_units_add_up_to_their_sublayer():
    names = ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.0.mlp.c_proj",
             "h.1.attn.c_attn", "h.1.mlp.c_fc"]
    shares = torch.tensor([[0.1, 0.2, 0.3, 0.1, 0.2, 0.1],
                           [math.nan] * 6], dtype=torch.float64)
    groups, grouped = group_shares(shares, names)
    assert groups == [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]
    torch.testing.assert_close(grouped[0], torch.tensor([0.3, 0.4, 0.2, 0.1],
                                                        dtype=torch.float64))
    means = mean_group_shares(shares, names)  # the undefined row is left out
    assert means == pytest.approx({(0, "attn"): 0.3, (0, "mlp"): 0.4, (1, "attn"): 0.2,
                                   (1, "mlp"): 0.1})


def test_only_a_method_with_units_and_a_positive_k_attributes():
    from cluster.scoring import ScoreSpec
    assert ScoreSpec(model_path="m").attributes  # linfac, top 100
    assert not ScoreSpec(model_path="m", attribution_top_k=0).attributes
    assert not ScoreSpec(model_path="m", influence=InfluenceConfig(method="repsim")).attributes
    with pytest.raises(ValueError, match="influence.attribution_top_k=-1"):
        ScoreSpec(model_path="m", attribution_top_k=-1)
    with pytest.raises(ValueError, match="influence.attribution_contrast=-2"):
        ScoreSpec(model_path="m", attribution_contrast=-2)


def test_the_benchmark_compares_each_planted_block_with_the_all_blocks_control():
    from bench.attribution import Setup, ratios, render, top_block
    setup = Setup(layers=2, seeds=(0,))
    even = {0: 0.5, 1: 0.5}
    rows = [dict(scenario="s", seed=0, planted=(0,), **{"planted in": "block 0"}, queries=3,
                 auprc=0.9, precision=1.0, shares={0: 0.2, 1: 0.8},
                 reliance={0: 0.9, 1: 0.1}),
            dict(scenario="s", seed=0, planted=(1,), **{"planted in": "block 1"}, queries=0),
            dict(scenario="s", seed=0, planted=(0, 1), **{"planted in": "all blocks"},
                 queries=3, auprc=0.8, precision=1.0, shares=even, reliance={0: 0.2, 1: 0.2})]
    assert ratios(rows, setup) == {("s", 0, "block 0"): pytest.approx(0.4)}
    # the reliance is made a fraction of the blocks' total before the ratio: 0.9 ÷ 0.5
    assert ratios(rows, setup, "reliance") == {("s", 0, "block 0"): pytest.approx(1.8)}
    assert top_block(rows, setup, "shares") == (0, 1)
    assert top_block(rows, setup, "reliance") == (1, 1)
    text = render(rows, setup, 1.0)
    assert "| s | block 0 | 3 | 0.9 | 1 | 0.2 | 0.8 | 0.40 | 0.9 | 0.1 | 1.80 |" in text
    assert "| s | block 1 | 0 | nan | nan | nan | nan | - | nan | nan | - |" in text  # not shown
    assert ("By the influence shares: the planted block is the top block in 0 of 1 (scenario, "
            "seed, block) cases, and carries more than in the all-blocks control in 0 of 1; "
            "median ratio 0.40") in text
    assert "By the reliance (dependence): the planted block is the top block in 1 of 1" in text
