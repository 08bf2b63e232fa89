"""Grouping influence queries for ``query_batch_size > 1`` by gradient similarity.

LANCET.md section 3 averages each batch of B queries into one preconditioned query. Batches taken
in file order mix whatever outputs sit next to each other: two wordings of a behaviour, or two
behaviours, whose gradients partly cancel in the mean. ``influence.query_grouping=similarity``
puts queries whose gradients point the same way into one batch instead.

Similarity is measured on a sketch of each query's unit gradients, never on the gradients
themselves (at 7B one query's gradient holds ~10⁹ numbers). Per unit, with Gaussian
``Ω_o [o, k]`` and ``Ω_i [i, k]`` (entries of variance 1/k, seeded),

    sketch(DŴ) = Ω_oᵀ DŴ Ω_i = Σ_t (Ω_oᵀ Ds_t)(Ω_iᵀ κ_t)ᵀ            [k, k]

is computed from the token vectors, and E⟨sketch(G₁), sketch(G₂)⟩ = ⟨G₁, G₂⟩. The sketches are
centred over the queries (what every query shares, such as common tokens, says nothing about
which behaviour it shows) and compared by cosine. Groups are then formed greedily: the first
unassigned query in file order and its B − 1 most similar unassigned queries, until none is
left. The result is an order of the queries in which each consecutive run of B is one group,
so preconditioning still streams one group at a time.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from operators.curvature import capture_pass
from operators.units import Unit

GROUPINGS = ("order", "similarity")
SKETCH_DIM = 32  # k: a k × k sketch per unit (65k numbers a query for a 32-layer model)


def _omega(n: int, k: int, seed: int, dtype: torch.dtype, device) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=generator, dtype=torch.float64) / k ** 0.5).to(
        device=device, dtype=dtype)


def query_sketches(model: nn.Module, units: list[Unit], batches: Iterable[dict[str, Tensor]],
                   k: int = SKETCH_DIM, seed: int = 0, logodds_cap: float = 1.0) -> Tensor:
    """One row per query: its unit gradients' sketches, concatenated ``[Q, U·k²]`` (float64)."""
    rows, omegas = [], {}
    for batch in batches:
        cap = capture_pass(model, units, batch, sampled=False, logodds_cap=logodds_cap)
        mask = batch["attention_mask"]
        parts = []
        for index, unit in enumerate(units):
            kappa, grad = cap.kappa(unit, mask), cap.output_grad(unit, mask)
            if unit.name not in omegas:
                omegas[unit.name] = (
                    _omega(grad.shape[-1], k, seed + 2 * index, grad.dtype, grad.device),
                    _omega(kappa.shape[-1], k, seed + 2 * index + 1, grad.dtype, grad.device))
            w_out, w_in = omegas[unit.name]
            sketch = torch.einsum("btk,btl->bkl", grad @ w_out, kappa.to(grad.dtype) @ w_in)
            parts.append(sketch.flatten(1).double().cpu())
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 0, dtype=torch.float64)


def similarity_order(sketches: Tensor, batch_size: int) -> list[int]:
    """An order of the queries whose consecutive runs of ``batch_size`` are the groups.

    Args:
        sketches: ``[Q, D]`` per-query sketches (``query_sketches``).

    Returns:
        A permutation of ``range(Q)``: group g is ``order[g·B : (g+1)·B]``.
    """
    n = sketches.shape[0]
    if batch_size <= 1 or n <= batch_size:
        return list(range(n))
    centred = sketches - sketches.mean(dim=0, keepdim=True)
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-30)
    free = torch.ones(n, dtype=torch.bool)
    order: list[int] = []
    while free.any():
        seed = int(torch.nonzero(free)[0])
        free[seed] = False
        similar = unit[free] @ unit[seed]
        candidates = torch.nonzero(free).flatten()
        take = candidates[torch.argsort(-similar, stable=True)[:batch_size - 1]]
        free[take] = False
        order += [seed] + sorted(take.tolist())
    return order
