"""Kronecker factors, their eigendecomposition, the eigenvalue correction and the IHVP.

LANCET.md section 2. Everything a worker accumulates is a *sum* plus a *count*, stored in a flat
``dict[str, Tensor]`` keyed ``"<unit>/<stat>"``, so merging shards (or an all-reduce) is key-wise
addition. Normalisation, symmetrisation and ``eigh`` happen once, after merging, in float64.

Stats per unit:
    ``a_sum [d_in', d_in']`` Σ κκᵀ over real tokens;   ``a_count`` number of those tokens
    ``s_sum [d_out, d_out]`` Σ Ds Dsᵀ over real tokens; ``s_count``
    ``lambda_sum [d_out, d_in']`` Σ_sequences (Q_Sᵀ DŴ Q_A)²;  ``lambda_count`` sequences
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from operators.units import Unit

FactorDict = dict[str, Tensor]


@dataclass(frozen=True)
class DampingConfig:
    """λ = ``relative`` · mean(Λ) per unit, or ``absolute`` when set (then ``relative`` is unused)."""

    relative: float = 0.1
    absolute: float | None = None

    def __post_init__(self) -> None:
        if not self.relative >= 0:  # `not >=` also refuses NaN
            raise ValueError(f"influence.damping={self.relative}: must be >= 0")
        if self.absolute is not None and not self.absolute >= 0:
            raise ValueError(f"influence.damping_absolute={self.absolute}: must be >= 0 or null")


def covariance_stats(kappa: Tensor, grad: Tensor, name: str, token_mask: Tensor) -> FactorDict:
    """Sums of one batch for one unit. ``kappa [B,T,i]``, ``grad [B,T,o]`` already masked."""
    k = kappa.reshape(-1, kappa.shape[-1]).double()
    g = grad.reshape(-1, grad.shape[-1]).double()
    count = token_mask.sum().double().reshape(1)
    return {f"{name}/a_sum": k.T @ k, f"{name}/a_count": count,
            f"{name}/s_sum": g.T @ g, f"{name}/s_count": count.clone()}


def merge(total: FactorDict | None, part: FactorDict) -> FactorDict:
    """Key-wise sum: the merge of two shards (and what an all-reduce computes)."""
    if total is None:
        return {key: value.clone() for key, value in part.items()}
    if total.keys() != part.keys():
        raise ValueError("cannot merge factor statistics of different units")
    return {key: total[key] + part[key] for key in total}


@dataclass(frozen=True)
class Eigen:
    """Eigenbases of one unit: ``A = Q_A diag(a) Q_Aᵀ``, ``S = Q_S diag(s) Q_Sᵀ`` (float64)."""

    qa: Tensor  # [i, i]
    a: Tensor  # [i]
    qs: Tensor  # [o, o]
    s: Tensor  # [o]


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
    """``Q_Sᵀ G Q_A`` for ``grad [..., o, i]``."""
    return eigen.qs.T.to(grad.dtype) @ grad @ eigen.qa.to(grad.dtype)


def lambda_stats(grads: Tensor, name: str, eigen: Eigen) -> FactorDict:
    """Eigenvalue-correction sums of one batch: Σ_b (Q_Sᵀ DŴ_b Q_A)² for ``grads [B, o, i]``."""
    rotated = rotate(grads.double(), eigen)
    return {f"{name}/lambda_sum": (rotated ** 2).sum(dim=0),
            f"{name}/lambda_count": torch.tensor([float(grads.shape[0])], dtype=torch.float64)}


def eigenvalues(stats: FactorDict | None, eigens: dict[str, Eigen], corrected: bool
                ) -> dict[str, Tensor]:
    """Λ per unit: the sequence-level correction (EK-FAC, LinFAC) or ``s aᵀ`` (KFAC)."""
    if not corrected:
        return {name: torch.outer(e.s, e.a) for name, e in eigens.items()}
    if stats is None:
        raise ValueError("eigenvalue correction needs lambda statistics")
    return {name: stats[f"{name}/lambda_sum"] / stats[f"{name}/lambda_count"].clamp_min(1.0)
            for name in eigens}


def damping_value(lam: Tensor, config: DampingConfig) -> float:
    """λ for one unit (LANCET.md: 0.1 · mean(Λ) unless configured)."""
    if config.absolute is not None:
        return float(config.absolute)
    value = config.relative * float(lam.mean())
    return value if value > 0 else 1e-8  # an all-zero unit (rank-deficient data) stays finite


def ihvp(vector: Tensor, eigen: Eigen, lam: Tensor, damping: float) -> Tensor:
    """``(G + λI)⁻¹ V = Q_S [(Q_Sᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ`` for ``vector [..., o, i]``."""
    dtype = vector.dtype
    rotated = rotate(vector.double(), eigen) / (lam + damping)
    return (eigen.qs @ rotated @ eigen.qa.T).to(dtype)
