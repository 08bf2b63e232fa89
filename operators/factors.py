"""Kronecker factors, their eigendecomposition, the eigenvalue correction and the IHVP.

LANCET.md section 2. Everything a worker accumulates is a *sum* plus a *count*, stored in a flat
``dict[str, Tensor]`` keyed ``"<unit>/<stat>"``, so merging shards (or an all-reduce) is key-wise
addition, done in place. Sums are float32 (float64 for a float64 model), counts float64, both on
the device of the batch. Normalisation, symmetrisation and ``eigh`` happen once, after merging,
in float64 on that device; the IHVP and the eigenvalue correction then use float32 copies of the
bases (``Eigen.cast``), so no float64 product runs per batch.

Stats per unit:
    ``a_sum [d_in', d_in']`` Σ κκᵀ over real tokens;   ``a_count`` number of those tokens
    ``s_sum [d_out, d_out]`` Σ Ds Dsᵀ over real tokens; ``s_count``
    ``lambda_sum [d_out, d_in']`` Σ_sequences (Q_Sᵀ DŴ Q_A)²;  ``lambda_count`` sequences
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from operators.errors import UserError
from operators.units import Unit

FactorDict = dict[str, Tensor]


@dataclass(frozen=True)
class DampingConfig:
    """λ = ``relative`` · mean(Λ) per unit, or ``absolute`` when set (then ``relative`` is unused)."""

    relative: float = 0.1
    absolute: float | None = None

    def __post_init__(self) -> None:
        if not self.relative >= 0:  # `not >=` also refuses NaN
            raise UserError(f"influence.damping={self.relative}: must be >= 0")
        if self.absolute is not None and not self.absolute >= 0:
            raise UserError(f"influence.damping_absolute={self.absolute}: must be >= 0 or null")


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics, IHVPs and scores run in float32, or float64 for a float64 model (the tests).

    A bfloat16 model's activations and gradients are upcast before any product, so no sum is
    accumulated in half precision; token and sequence counts are always float64 (exact to 2^53).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_covariance(total: FactorDict, kappa: Tensor, grad: Tensor, name: str,
                   token_mask: Tensor) -> FactorDict:
    """Add one batch's sums for one unit to ``total`` in place (allocating on first use).

    ``kappa [B,T,i]``, ``grad [B,T,o]`` already masked; the sums live on their device.
    """
    dtype = stat_dtype(kappa.dtype)
    k = kappa.reshape(-1, kappa.shape[-1]).to(dtype)
    g = grad.reshape(-1, grad.shape[-1]).to(dtype)
    count = token_mask.sum().to(torch.float64).reshape(1)
    for which, x in (("a", k), ("s", g)):
        key = f"{name}/{which}_sum"
        if key not in total:
            total[key] = torch.zeros(x.shape[1], x.shape[1], dtype=dtype, device=x.device)
            total[f"{name}/{which}_count"] = torch.zeros(1, dtype=torch.float64, device=x.device)
        total[key].addmm_(x.T, x)
        total[f"{name}/{which}_count"] += count
    return total


def covariance_stats(kappa: Tensor, grad: Tensor, name: str, token_mask: Tensor) -> FactorDict:
    """Sums of one batch for one unit. ``kappa [B,T,i]``, ``grad [B,T,o]`` already masked."""
    return add_covariance({}, kappa, grad, name, token_mask)


def merge(total: FactorDict | None, part: FactorDict) -> FactorDict:
    """Key-wise sum, in place on ``total``: the merge of two shards (what an all-reduce computes).

    Summing in place keeps one copy of the statistics, not two per batch.
    """
    if total is None:
        return {key: value.clone() for key, value in part.items()}
    if total.keys() != part.keys():
        raise ValueError("cannot merge factor statistics of different units")
    for key, value in part.items():
        total[key] += value.to(total[key].device)
    return total


@dataclass(frozen=True)
class Eigen:
    """Eigenbases of one unit: ``A = Q_A diag(a) Q_Aᵀ``, ``S = Q_S diag(s) Q_Sᵀ`` (float64)."""

    qa: Tensor  # [i, i]
    a: Tensor  # [i]
    qs: Tensor  # [o, o]
    s: Tensor  # [o]

    def cast(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Eigen:
        """The same bases in the compute dtype (float32 on the hot path: no float64 products)."""
        return Eigen(*(t.to(device=device or t.device, dtype=dtype)
                       for t in (self.qa, self.a, self.qs, self.s)))


def eigendecompose(stats: FactorDict, units: list[Unit]) -> dict[str, Eigen]:
    """Normalise the merged sums, symmetrise and ``eigh`` them in float64."""
    out = {}
    for unit in units:
        a = _normalised(stats, unit.name, "a")
        s = _normalised(stats, unit.name, "s")
        a_eig, qa = torch.linalg.eigh(a)
        s_eig, qs = torch.linalg.eigh(s)
        out[unit.name] = Eigen(qa, a_eig.clamp_min(0.0), qs, s_eig.clamp_min(0.0))
    return out


def _normalised(stats: FactorDict, name: str, which: str) -> Tensor:
    total = stats[f"{name}/{which}_sum"].double()
    count = stats[f"{name}/{which}_count"].double().clamp_min(1.0)
    matrix = total / count
    return 0.5 * (matrix + matrix.T)


def rotate(grad: Tensor, eigen: Eigen) -> Tensor:
    """``Q_Sᵀ G Q_A`` for ``grad [..., o, i]`` (in ``grad``'s dtype)."""
    return eigen.qs.T.to(grad.dtype) @ grad @ eigen.qa.to(grad.dtype)


def rotated_gradients(kappa: Tensor, grad: Tensor, eigen: Eigen) -> Tensor:
    """Per-sequence ``Q_Sᵀ DŴ_b Q_A``: ``[B, o, i]`` from ``kappa [B,T,i]``, ``grad [B,T,o]``.

    ``Q_Sᵀ (Σ_t g_t κ_tᵀ) Q_A = Σ_t (Q_Sᵀ g_t)(Q_Aᵀ κ_t)ᵀ``: rotating the T token vectors first
    costs ``T (o² + i²)`` against ``o i (o + i)`` for rotating the formed gradient, several
    times less whenever the sequence is shorter than the widths. ``eigen`` is in the compute
    dtype already (``Eigen.cast``).
    """
    o, i, t = grad.shape[-1], kappa.shape[-1], kappa.shape[1]
    g, k = grad.to(eigen.qs.dtype), kappa.to(eigen.qa.dtype)
    if t * (o * o + i * i) <= o * i * (o + i):
        return torch.einsum("bto,bti->boi", g @ eigen.qs, k @ eigen.qa)
    return rotate(torch.einsum("bto,bti->boi", g, k), eigen)


def add_lambda(total: FactorDict, rotated: Tensor, name: str, count: Tensor | int | None = None
               ) -> FactorDict:
    """Add Σ_b (Q_Sᵀ DŴ_b Q_A)² of ``rotated [B, o, i]`` to ``total`` in place.

    ``count``: the sequences to count (default all B; fewer when dropped rows are zeros).
    """
    key = f"{name}/lambda_sum"
    if key not in total:
        total[key] = torch.zeros(rotated.shape[1:], dtype=rotated.dtype, device=rotated.device)
        total[f"{name}/lambda_count"] = torch.zeros(1, dtype=torch.float64, device=rotated.device)
    total[key] += (rotated ** 2).sum(dim=0)
    total[f"{name}/lambda_count"] += rotated.shape[0] if count is None else count
    return total


def lambda_stats(grads: Tensor, name: str, eigen: Eigen) -> FactorDict:
    """Eigenvalue-correction sums of one batch: Σ_b (Q_Sᵀ DŴ_b Q_A)² for ``grads [B, o, i]``."""
    dtype = stat_dtype(grads.dtype)
    return add_lambda({}, rotate(grads.to(dtype), eigen.cast(dtype)), name)


def eigenvalues(stats: FactorDict | None, eigens: dict[str, Eigen], corrected: bool
                ) -> dict[str, Tensor]:
    """Λ per unit: the sequence-level correction (EK-FAC, LinFAC) or ``s aᵀ`` (KFAC)."""
    if not corrected:  # on the device of the eigenbases (host memory after a distributed fit)
        return {name: torch.outer(e.s, e.a) for name, e in eigens.items()}
    if stats is None:
        raise ValueError("eigenvalue correction needs lambda statistics")
    return {name: stats[f"{name}/lambda_sum"].to(eigens[name].a.device, torch.float64)
            / stats[f"{name}/lambda_count"].to(eigens[name].a.device).clamp_min(1.0)
            for name in eigens}


def damping_value(lam: Tensor, config: DampingConfig) -> float:
    """λ for one unit (LANCET.md: 0.1 · mean(Λ) unless configured)."""
    if config.absolute is not None:
        return float(config.absolute)
    value = config.relative * float(lam.mean())
    return value if value > 0 else 1e-8  # an all-zero unit (rank-deficient data) stays finite


def ihvp(vector: Tensor, eigen: Eigen, lam: Tensor, damping: float) -> Tensor:
    """``(G + λI)⁻¹ V = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ`` for ``vector [..., o, i]``.

    Computed in ``stat_dtype(vector.dtype)`` (float32 unless the vector is float64) on the
    vector's device; returned in that dtype.
    """
    dtype = stat_dtype(vector.dtype)
    basis = eigen.cast(dtype, vector.device)
    rotated = rotate(vector.to(dtype), basis) / (lam.to(vector.device, dtype) + damping)
    return basis.qs @ rotated @ basis.qa.T
