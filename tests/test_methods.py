"""The influence-method registry: a new method is one entry (operators/methods.py) and every
stage follows it; shown with a toy method registered from here."""

import pytest
import torch
from tiny_models import random_batch, tiny_model

from cluster.factor_job import FactorSpec
from operators.curvature import fit_curvature
from operators.methods import METHODS, SUBLAYER, InfluenceMethod, get_method, register
from operators.scores import InfluenceConfig, precondition_queries, score_batch, units_for


@pytest.fixture
def toy(monkeypatch):
    """LinFAC's sublayer units without the eigenvalue correction (a K-FAC over sublayers)."""
    monkeypatch.setattr("operators.methods.METHODS", dict(METHODS))
    return register(InfluenceMethod("sublayer_kfac", SUBLAYER, curvature=True))


def scores(method: str, corrected: bool):
    config = InfluenceConfig(method=method, fisher="empirical")
    model = tiny_model()
    units = units_for(model, config)
    curvature = fit_curvature(model, units, [random_batch(batch=6, seed=5)], corrected=corrected,
                              fisher="empirical")
    queries = precondition_queries(model, units, [random_batch(batch=2, seed=9)], config,
                                   curvature)
    return units, score_batch(model, units, random_batch(batch=4, seed=1), queries, config)


def test_a_registered_method_is_configured_fitted_and_scored_as_its_entry_says(toy):
    config = InfluenceConfig(method="sublayer_kfac")
    assert config.uses_curvature and not FactorSpec("m", method="sublayer_kfac").corrected
    units, got = scores("sublayer_kfac", corrected=False)
    linfac_units, _ = scores("linfac", corrected=True)
    assert [u.name for u in units] == [u.name for u in linfac_units]  # the sublayers
    _, expected = scores("linfac", corrected=False)  # LinFAC's units, no λ pass
    torch.testing.assert_close(got, expected)


def test_an_unknown_method_names_the_key_and_the_choices():
    with pytest.raises(ValueError, match=r"influence.method='lissa': expected one of \('linfac'"):
        get_method("lissa")
    with pytest.raises(ValueError, match="curvature needs gradient units"):
        InfluenceMethod("bad", None, curvature=True)


def test_every_method_has_its_yaml():
    from pipeline.config import conf_dir
    assert sorted(p.stem for p in (conf_dir() / "influence").glob("*.yaml")) == sorted(METHODS)
