"""Factors, eigenvalue correction and IHVP against explicit dense references (float64)."""

import pytest
import torch
from tiny_models import random_batch, slice_batch, tiny_model

from operators.curvature import covariance_pass, fit_curvature, lambda_pass
from operators.factors import DampingConfig, Eigen, damping_value, eigendecompose, ihvp, merge
from operators.units import discover_units


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T / n + 0.01 * torch.eye(n, dtype=torch.float64)


def eigen_of(a, s):
    a_eig, qa = torch.linalg.eigh(a)
    s_eig, qs = torch.linalg.eigh(s)
    return Eigen(qa, a_eig, qs, s_eig)


def test_kfac_ihvp_equals_solve_on_the_explicit_kronecker_matrix():
    a, s = spd(5, 0), spd(3, 1)
    e = eigen_of(a, s)
    v = torch.randn(2, 3, 5, dtype=torch.float64)
    damping = 0.05
    got = ihvp(v, e, torch.outer(e.s, e.a), damping)
    # vec(V) row-major: (S ⊗ A) vec(V) = vec(S V A) for symmetric A
    dense = torch.kron(s, a) + damping * torch.eye(15, dtype=torch.float64)
    want = torch.linalg.solve(dense, v.reshape(2, 15).T).T.reshape(2, 3, 5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_ekfac_ihvp_equals_solve_on_the_explicit_eigenbasis_matrix():
    e = eigen_of(spd(4, 2), spd(3, 3))
    lam = torch.rand(3, 4, dtype=torch.float64) + 0.1
    v = torch.randn(3, 4, dtype=torch.float64)
    basis = torch.kron(e.qs, e.qa)  # columns: vec(q_s,i q_a,jᵀ)
    dense = basis @ torch.diag(lam.flatten()) @ basis.T + 0.2 * torch.eye(12, dtype=torch.float64)
    want = torch.linalg.solve(dense, v.flatten()).reshape(3, 4)
    torch.testing.assert_close(ihvp(v, e, lam, 0.2), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["linfac", "ekfac"])
def test_factor_sums_over_two_shards_equal_the_whole_batch(method):
    model = tiny_model("gpt2")
    units = discover_units(model, method)
    batch = random_batch(batch=6)
    whole = covariance_pass(model, units, [batch], fisher="empirical")
    shards = [covariance_pass(model, units, [slice_batch(batch, rows)], fisher="empirical")
              for rows in ([0, 1, 2], [3, 4, 5])]
    merged = merge(shards[0], shards[1])
    for key in whole:
        torch.testing.assert_close(merged[key], whole[key], rtol=1e-10, atol=1e-12)


def test_sampled_fisher_is_seeded_and_differs_from_empirical():
    model = tiny_model("gpt2")
    units = discover_units(model, "linfac")
    batch = random_batch()
    a = covariance_pass(model, units, [batch], fisher="sampled", seed=3)
    b = covariance_pass(model, units, [batch], fisher="sampled", seed=3)
    c = covariance_pass(model, units, [batch], fisher="empirical")
    key = f"{units[0].name}/s_sum"
    torch.testing.assert_close(a[key], b[key])
    assert not torch.allclose(a[key], c[key])


def test_mixed_fisher_takes_the_datas_factors_and_a_sampled_eigenvalue_correction():
    """``mixed``: the factors (so the eigenbasis) of the data's labels, Λ of sampled ones."""
    model = tiny_model("gpt2")
    units = discover_units(model, "linfac")
    batch = random_batch()
    mixed = covariance_pass(model, units, [batch], fisher="mixed")
    data = covariance_pass(model, units, [batch], fisher="empirical")
    for key in data:
        torch.testing.assert_close(mixed[key], data[key])
    eigens = eigendecompose(data, units)
    lam = {f: lambda_pass(model, units, eigens, [batch], fisher=f, seed=7)
           for f in ("mixed", "sampled", "empirical")}
    key = f"{units[0].name}/lambda_sum"
    torch.testing.assert_close(lam["mixed"][key], lam["sampled"][key])
    assert not torch.allclose(lam["mixed"][key], lam["empirical"][key])


def test_rank_deficient_factors_stay_finite():
    model = tiny_model("gpt2")
    units = discover_units(model, "ekfac")
    one = slice_batch(random_batch(batch=1, length=4), [0])  # 4 tokens, far fewer than widths
    curvature = fit_curvature(model, units, [one], fisher="empirical")
    v = {u.name: torch.randn(1, *u.shape, dtype=torch.float64) for u in units}
    out = curvature.ihvp(v)
    assert all(torch.isfinite(t).all() for t in out.values())
    assert damping_value(torch.zeros(3, 3), DampingConfig()) > 0


def test_curvature_round_trips_through_flat_tensors():
    from operators.curvature import Curvature
    model = tiny_model("gpt2")
    units = discover_units(model, "linfac")
    curv = fit_curvature(model, units, [random_batch()], fisher="empirical")
    back = Curvature.from_tensors(curv.to_tensors(), [u.name for u in units])
    v = {u.name: torch.randn(2, *u.shape, dtype=torch.float64) for u in units}
    for name, t in curv.ihvp(v).items():
        torch.testing.assert_close(back.ihvp(v)[name], t)
