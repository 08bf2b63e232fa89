"""The aggregation rules measured by the scenario suite (operators.scores.MEASURED_AGGREGATES)."""

import math

import pytest
import torch

from operators.errors import UserError
from operators.scores import AGGREGATES, MEASURED_AGGREGATES, InfluenceConfig, aggregate

RULES = AGGREGATES + MEASURED_AGGREGATES


def raw_scores(seed=0, n=20, q=4):
    return torch.randn(n, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("how", RULES)
def test_every_rule_ignores_a_positive_rescaling_of_a_column(how):
    raw = raw_scores()
    scaled = raw * torch.tensor([1.0, 1e3, 1e-3, 7.0], dtype=torch.float64)
    torch.testing.assert_close(aggregate(scaled, how), aggregate(raw, how))


@pytest.mark.parametrize("how", MEASURED_AGGREGATES)
def test_new_rules_ignore_a_shift_of_a_column(how):
    raw = raw_scores(1)
    shifted = raw + torch.tensor([5.0, -3.0, 0.0, 100.0], dtype=torch.float64)
    torch.testing.assert_close(aggregate(shifted, how), aggregate(raw, how))


@pytest.mark.parametrize("how", RULES)
def test_a_row_that_drives_every_query_ranks_first_and_one_that_inhibits_last(how):
    raw = raw_scores(2)
    raw[3], raw[7] = 10.0, -10.0
    score = aggregate(raw, how)
    assert score.argmax() == 3 and score.argmin() == 7


def test_zmax_keeps_the_sign_of_a_standardised_score():
    raw = torch.tensor([[4.0], [-2.0], [1.0], [1.0]], dtype=torch.float64)  # column mean 1
    score = aggregate(raw, "zmax")
    assert score[0] > 0 > score[1] and score[2] == 0


def test_rank_is_the_mean_column_rank_in_0_1():
    raw = torch.tensor([[1.0, 3.0], [2.0, 1.0], [3.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(aggregate(raw, "rank"),
                               torch.tensor([2.0, 1.5, 2.5], dtype=torch.float64) / 3)


@pytest.mark.parametrize("how", RULES)
def test_a_non_finite_row_scores_nan_and_leaves_the_others_alone(how):
    raw = raw_scores(3)
    spoiled = raw.clone()
    spoiled = torch.cat([spoiled, torch.tensor([[math.nan, 1.0, 1.0, 1.0]],
                                               dtype=torch.float64)])
    score = aggregate(spoiled, how)
    assert math.isnan(score[-1]) and torch.isfinite(score[:-1]).all()
    if how in MEASURED_AGGREGATES:  # whole-column statistics skip the non-finite row
        torch.testing.assert_close(score[:-1], aggregate(raw, how))


def test_measured_rules_are_not_yet_config_options():
    with pytest.raises(UserError, match="influence.aggregate"):
        InfluenceConfig(aggregate="zmax")
