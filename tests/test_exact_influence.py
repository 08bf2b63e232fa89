"""Against the exact answer: the dense damped Gauss-Newton Hessian of a model small enough to invert.

The exact influence is gᵀ_q (G + λI)⁻¹ g_m over the real parameters of the blocks' linear modules,
with G the exact Gauss-Newton Hessian of the summed token cross-entropy (the expected Fisher) and
λ = 0.1 · mean eigenvalue, the same relative rule the approximations use per unit. With
``influence.logodds_cap`` c each token's gradient is weighted by w(p_y) = min(1 / (1 − p_y), c),
and G is the Fisher of those weighted gradients: Jᵀ E_{y∼p}[w_y² (p − e_y)(p − e_y)ᵀ] J.
"""

import pytest
import torch
from tiny_models import conv1d_to_linear, random_batch, tiny_model
from torch.func import functional_call, jacrev

from operators.curvature import fit_curvature
from operators.metrics import spearman
from operators.scores import InfluenceConfig, precondition_queries, score_batch, units_for
from operators.sequences import sequence_losses
from operators.units import discover_units

REPORT: dict[str, float] = {}


def briefly_trained_model():
    model = conv1d_to_linear(tiny_model("gpt2", width=8, layers=1))
    data = random_batch(batch=24, length=8, seed=11)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(30):
        opt.zero_grad()
        sequence_losses(model, data).mean().backward()
        opt.step()
    return model.eval(), data


def exact_gauss_newton(model, names, batch, cap=1.0):
    params = {n: p.detach() for n, p in model.named_parameters()}
    keep = {n: params[n] for n in names}

    def logits_of(sub, ids, mask):
        full = {**params, **sub}
        out = functional_call(model, full, (), {"input_ids": ids, "attention_mask": mask})
        return out.logits[0]

    size = sum(p.numel() for p in keep.values())
    total = torch.zeros(size, size, dtype=torch.float64)
    n = batch["input_ids"].shape[0]
    for row in range(n):
        ids, mask = batch["input_ids"][row:row + 1], batch["attention_mask"][row:row + 1]
        jac = jacrev(logits_of)(keep, ids, mask)  # name -> [T, V, *shape]
        j = torch.cat([jac[k].flatten(2) for k in names], dim=2)  # [T, V, P]
        logits = logits_of(keep, ids, mask).detach()
        targets = batch["loss_mask"][row, 1:].bool()
        for t in targets.nonzero().flatten().tolist():  # logits at t predict token t + 1
            p = torch.softmax(logits[t], dim=-1)
            a = p * (1 / (1 - p)).clamp(max=cap) ** 2  # p_y w_y²
            h = a.sum() * torch.outer(p, p) - torch.outer(p, a) - torch.outer(a, p) + torch.diag(a)
            total += j[t].T @ h @ j[t]
    return total / n


def flat_grads(model, names, batch, cap=1.0):
    params = dict(model.named_parameters())
    rows = []
    for row in range(batch["input_ids"].shape[0]):
        one = {k: v[row:row + 1] for k, v in batch.items()}
        loss = sequence_losses(model, one, logodds_cap=cap).sum()
        grads = torch.autograd.grad(loss, [params[k] for k in names])
        rows.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("cap", [1.0, 10.0])
def test_ekfac_tracks_exact_influence_better_than_gradsim(cap):
    model, train = briefly_trained_model()
    queries = random_batch(batch=4, length=8, seed=12)
    units = discover_units(model, "ekfac")
    names = [n for u in units for n, _ in u.output_module.named_parameters(prefix=u.name)]
    gn = exact_gauss_newton(model, names, train, cap)
    damping = 0.1 * float(torch.linalg.eigvalsh(gn).clamp_min(0).mean())
    g_train = flat_grads(model, names, train, cap)
    g_query = flat_grads(model, names, queries, cap)
    solved = torch.linalg.solve(gn + damping * torch.eye(gn.shape[0], dtype=gn.dtype), g_query.T)
    exact = g_train @ solved  # [train, queries]

    correlations = {}
    for method in ("linfac", "ekfac", "kfac", "gradsim"):
        config = InfluenceConfig(method=method, logodds_cap=cap)
        units = units_for(model, config)
        curv = None
        if config.uses_curvature:  # the expected Fisher, estimated with 64 label draws
            curv = fit_curvature(model, units, [train] * 64, fisher="sampled",
                                 corrected=config.kind.eigen_correction, logodds_cap=cap)
        feats = precondition_queries(model, units, [queries], config, curv)
        approx = score_batch(model, units, train, feats, config)
        correlations[method] = sum(spearman(approx[:, q], exact[:, q]) for q in range(4)) / 4
    REPORT.update({f"{k}, c={cap:g}": v for k, v in correlations.items()})
    print(f"spearman with exact influence, logodds_cap={cap:g}:",
          {k: round(v, 3) for k, v in correlations.items()})
    assert all(torch.isfinite(torch.tensor(v)) for v in correlations.values())
    assert correlations["ekfac"] > correlations["gradsim"]
    assert correlations["ekfac"] > 0.4
    # LinFAC's units are whole sublayers: its gradient DŴ = Σ_t Ds_t κ_tᵀ lives in the space of
    # one linear map per sublayer (κ mixes tokens through ā), not in the space of the model's
    # parameters where this exact influence is taken, so it cannot reach EK-FAC's agreement
    # here (0.39 vs 0.52 on this model); it must still beat plain gradient similarity.
    assert correlations["linfac"] > correlations["gradsim"]
    assert correlations["linfac"] > 0.3
