"""Low-rank preconditioned queries: ``P ≈ U Vᵀ`` per unit, scored from token vectors.

A preconditioned query gradient of a unit is a ``[o, i]`` matrix: at Llama-2-7B width one query
holds ~1.07e9 numbers over its 64 units, so a scorer cannot keep 64 of them. Keeping the top
``r`` singular directions (``U = u_r σ_r [o, r]``, ``V = v_r [i, r]``) costs ``r (o + i)`` per unit
instead of ``o i``, and the score against a training sequence needs no ``[o, i]`` gradient at all:

    ⟨U Vᵀ, Σ_t Ds_t κ_tᵀ⟩ = Σ_t Σ_r (Ds_t · U_r)(κ_t · V_r)

which costs ``T r (o + i)`` per query instead of ``T o i`` to form the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def compress(matrix: Tensor, rank: int, oversample: int = 8, iterations: int = 4
             ) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of ``matrix [o, i]``: ``(U σ [o, r], V [i, r])`` with ``r ≤ rank``.

    At or above full rank the exact SVD is used, so the factors reproduce ``matrix`` to
    rounding; below it a randomized SVD (Halko et al.) with ``oversample`` extra directions and
    ``iterations`` power iterations, computed in float32 or better on the matrix's device.
    """
    full = min(matrix.shape)
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    if rank >= full or rank + oversample >= full:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        v = vh.mT
    else:
        u, s, v = torch.svd_lowrank(work, q=rank + oversample, niter=iterations)
    r = min(rank, s.shape[0])
    return u[:, :r] * s[:r], v[:, :r]


def lowrank_scores(grad: Tensor, kappa: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Scores of sequences against low-rank queries: ``[B, G]``.

    Args:
        grad: ``Ds [B, T, o]`` (masked); kappa: ``κ [B, T, i]`` (masked).
        u: ``[G, o, r]``; v: ``[G, i, r]`` (one pair per query batch).
    """
    dtype = u.dtype
    left = torch.einsum("bto,gor->bgtr", grad.to(dtype), u)
    right = torch.einsum("bti,gir->bgtr", kappa.to(dtype), v)
    return (left * right).sum(dim=(2, 3))


def token_path_is_cheaper(tokens: int, d_out: int, d_in: int, queries: int, rank: int) -> bool:
    """Scoring from token vectors (``T G r (o+i)``) vs forming ``DŴ`` (``T o i + o i G r``)."""
    return tokens * queries * rank * (d_out + d_in) <= d_out * d_in * (tokens + queries * rank)


def formed_scores(grads: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Scores of formed gradients ``grads [B, o, i]`` against low-rank queries: ``[B, G]``."""
    dtype = u.dtype
    projected = torch.einsum("boi,gir->bgor", grads.to(dtype), v)
    return torch.einsum("bgor,gor->bg", projected, u)
