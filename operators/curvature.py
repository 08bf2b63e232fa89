"""Fitting the curvature over batches: the two passes every Kronecker method shares.

Pass 1 accumulates factor sums (``A``, ``S``); after merging and ``eigh``, pass 2 accumulates the
sequence-level eigenvalue correction. ``fisher`` says where each pass's labels come from (the
model's own samples give the Fisher, the Gauss-Newton Hessian of softmax cross-entropy; the
data's labels the empirical Fisher): see ``FISHER_KINDS``. A distributed caller
runs each pass on its shard and sums the returned dicts (see ``factors.merge``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from operators.capture import Capture, eval_mode, unit_gradients
from operators.errors import UserError
from operators.factors import (
    DampingConfig,
    Eigen,
    FactorDict,
    add_covariance,
    add_lambda,
    damping_value,
    eigendecompose,
    eigenvalues,
    ihvp,
    rotated_gradients,
    stat_dtype,
)
from operators.sequences import sequence_losses
from operators.units import Unit

# The labels of the curvature's gradients: ``sampled`` from the model in both passes (the true
# Fisher, LANCET.md section 1); ``empirical``: the data's in both; ``mixed``: the data's for the
# factors (A does not depend on labels; S, and so the eigenbasis, then follows the gradients
# that are scored), sampled for the eigenvalue correction Λ (the model's own curvature in that
# basis). Measured (docs/METHOD.md section 1): ``mixed`` keeps sampled's recall on the scenario
# suite (development median AUPRC 0.982 / 0.986 on two label seeds against 0.965-0.987) and has
# empirical's LDS (0.865 against sampled's 0.828), for every Kronecker method alike.
FISHER_KINDS = ("mixed", "sampled", "empirical")
DEFAULT_FISHER = "mixed"
# Every gradient of the influence machinery (both curvature passes, the queries, the training
# rows) weighs each token's −log p gradient by min(1 / (1 − p), c), c = ``influence.logodds_cap``
# (``operators.sequences.sequence_losses``). The −log p gradient of a token is (1 − p) times
# that of its log-odds, so it vanishes as the model memorises the token: a behaviour learned to
# convergence leaves almost no trace in its own rows. c = 1 is the plain likelihood, c → ∞ the
# log-odds (TRAK's margin); in between a memorised token keeps up to c times its weight while
# the tokens the model is unsure of (where a row's answer competes with another) keep theirs.
# The default is c = 10: over three draws of ``python -m bench.suite``'s scenarios (corpora,
# models and queries regenerated), the development median AUPRC at c = 10 against c = 1 is
# 0.967 / 0.974 (the first draw), 0.918 / 0.856 and 1.000 / 0.905; c = 1 led on one draw by
# 0.007 and lost the others by 0.06-0.10, and the converged habits (the catchphrase scenarios)
# gain 0.2-0.3 on every draw (docs/METHOD.md section 3).
DEFAULT_LOGODDS_CAP = 10.0


def check_logodds_cap(logodds_cap) -> float:
    """``influence.logodds_cap`` as a float, refused naming the key unless finite and ≥ 1."""
    try:
        value = float(logodds_cap)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise UserError(f"influence.logodds_cap={logodds_cap!r}: must be a finite number >= 1 "
                        "(1: the plain log-likelihood)")
    return value


def sampled_labels(fisher: str, correction: bool) -> bool:
    """Whether a pass draws its labels from the model: the factors' pass (``correction`` False)
    under ``sampled`` only, the eigenvalue correction's under ``sampled`` and ``mixed``."""
    return fisher == "sampled" or (correction and fisher == "mixed")


@contextmanager
def activation_gradients(model: nn.Module) -> Iterator[None]:
    """Backward reaches every unit's output but computes no parameter gradient.

    Parameters are frozen for the pass and the input embeddings' output is made to require a
    gradient: hooks see the same Ds at half the cost and no ``.grad`` is left behind.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    handle = model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: out.requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()
        for param, flag in flags:
            param.requires_grad_(flag)


def capture_pass(model: nn.Module, units: list[Unit], batch: dict[str, Tensor], *,
                 sampled: bool, generator: torch.Generator | None = None,
                 logodds_cap: float = 1.0) -> Capture:
    """One forward + backward of the summed sequence losses with hooks on ``units``."""
    with eval_mode(model), activation_gradients(model), Capture(units) as cap:
        losses = sequence_losses(model, batch, sampled=sampled, generator=generator,
                                 logodds_cap=logodds_cap)
        losses.sum().backward()
    return cap


def batch_gradients(model: nn.Module, units: list[Unit], batch: dict[str, Tensor], *,
                    sampled: bool = False, generator: torch.Generator | None = None,
                    logodds_cap: float = 1.0) -> dict[str, Tensor]:
    """Per-sequence unit gradients of −log p(y|x) (tokens weighted by ``logodds_cap``): name ->
    ``[B, d_out, d_in (+1)]``."""
    cap = capture_pass(model, units, batch, sampled=sampled, generator=generator,
                       logodds_cap=logodds_cap)
    return unit_gradients(cap, units, batch["attention_mask"])


def covariance_pass(model: nn.Module, units: list[Unit], batches: Iterable[dict[str, Tensor]],
                    fisher: str = DEFAULT_FISHER, seed: int = 0,
                    logodds_cap: float = 1.0) -> FactorDict | None:
    """Σ κκᵀ, Σ Ds Dsᵀ and token counts over ``batches`` (None if there were none).

    Sums are added in place on the batches' device: one copy of the statistics, whatever the
    number of batches.
    """
    generator = torch.Generator().manual_seed(seed)
    total: FactorDict | None = None
    for batch in batches:
        cap = capture_pass(model, units, batch, sampled=sampled_labels(fisher, False),
                           generator=generator, logodds_cap=logodds_cap)
        pairs, keep = _finite_pairs(cap, units, batch["attention_mask"])
        mask = batch["attention_mask"] * keep.unsqueeze(1)
        total = {} if total is None else total
        _count_nonfinite(total, keep)
        for unit in units:
            add_covariance(total, *pairs[unit.name], unit.name, mask)
    return total


NONFINITE = "_nonfinite/sequences"


def _finite_pairs(cap: Capture, units: list[Unit], mask: Tensor
                  ) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """Each unit's (κ, Ds) with the sequences holding a NaN/inf zeroed, and ``keep [B]``."""
    pairs = {u.name: (cap.kappa(u, mask), cap.output_grad(u, mask)) for u in units}
    keep = finite_rows([t for pair in pairs.values() for t in pair])
    pairs = {name: (_zero_rows(k, keep), _zero_rows(g, keep)) for name, (k, g) in pairs.items()}
    return pairs, keep


def _count_nonfinite(total: FactorDict, keep: Tensor) -> None:
    if NONFINITE not in total:
        total[NONFINITE] = torch.zeros(1, dtype=torch.float64, device=keep.device)
    total[NONFINITE] += (~keep).sum().to(torch.float64)


def finite_rows(tensors: list[Tensor]) -> Tensor:
    """``[B]`` bool: the sequences whose captured tensors are all finite.

    A NaN or infinite value (a corrupt sample, an overflow) is dropped from the statistics and
    counted instead of poisoning the factors of every unit.
    """
    keep = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        keep &= torch.isfinite(t).flatten(1).all(dim=1)
    return keep


def _zero_rows(t: Tensor, keep: Tensor) -> Tensor:
    return torch.where(keep.view(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t))


def lambda_pass(model: nn.Module, units: list[Unit], eigens: dict[str, Eigen],
                batches: Iterable[dict[str, Tensor]], fisher: str = DEFAULT_FISHER, seed: int = 1,
                logodds_cap: float = 1.0) -> FactorDict | None:
    """Σ_sequences (Q_Sᵀ DŴ Q_A)² and sequence counts over ``batches``.

    Unit by unit: only one unit's rotated per-sequence gradients ``[B, o, i]`` exist at a time,
    computed from the rotated token vectors (``rotated_gradients``) in float32 (float64 for a
    float64 model) with bases cast once, before the first batch.
    """
    generator = torch.Generator().manual_seed(seed)
    total: FactorDict | None = None
    bases: dict[str, Eigen] = {}
    for batch in batches:
        cap = capture_pass(model, units, batch, sampled=sampled_labels(fisher, True),
                           generator=generator, logodds_cap=logodds_cap)
        pairs, keep = _finite_pairs(cap, units, batch["attention_mask"])
        total = {} if total is None else total
        _count_nonfinite(total, keep)
        for unit in units:
            kappa, grad = pairs.pop(unit.name)  # a dropped sequence is all zeros: adds nothing
            if unit.name not in bases:
                bases[unit.name] = eigens[unit.name].cast(stat_dtype(kappa.dtype), kappa.device)
            add_lambda(total, rotated_gradients(kappa, grad, bases[unit.name]), unit.name,
                       keep.sum())
            del kappa, grad
    return total


@dataclass
class Curvature:
    """Everything the IHVP needs, per unit: eigenbases, eigenvalues Λ and damping λ."""

    eigens: dict[str, Eigen]
    lambdas: dict[str, Tensor]
    dampings: dict[str, float]

    @classmethod
    def build(cls, eigens: dict[str, Eigen], lam_stats: FactorDict | None, corrected: bool,
              damping: DampingConfig) -> Curvature:
        lambdas = eigenvalues(lam_stats, eigens, corrected)
        return cls(eigens, lambdas, {n: damping_value(v, damping) for n, v in lambdas.items()})

    def ihvp(self, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        """Apply ``(G + λI)⁻¹`` unit by unit to ``grads`` name -> ``[..., o, i]``."""
        return {name: ihvp(g, self.eigens[name], self.lambdas[name], self.dampings[name])
                for name, g in grads.items()}

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Curvature:
        """The curvature on ``device`` in the compute ``dtype``, cast once (not per IHVP)."""
        return Curvature({n: e.cast(dtype, device) for n, e in self.eigens.items()},
                         {n: v.to(device, dtype) for n, v in self.lambdas.items()},
                         dict(self.dampings))

    def to_tensors(self) -> dict[str, Tensor]:
        """Flat dict for safetensors (on the CPU, whatever device it was fitted on)."""
        out: dict[str, Tensor] = {}
        for name, eig in self.eigens.items():
            out.update({f"{name}/qa": eig.qa, f"{name}/a": eig.a, f"{name}/qs": eig.qs,
                        f"{name}/s": eig.s, f"{name}/lambda": self.lambdas[name],
                        f"{name}/damping": torch.tensor([self.dampings[name]],
                                                        dtype=torch.float64)})
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], names: list[str]) -> Curvature:
        eigens = {n: Eigen(tensors[f"{n}/qa"], tensors[f"{n}/a"], tensors[f"{n}/qs"],
                           tensors[f"{n}/s"]) for n in names}
        lambdas = {n: tensors[f"{n}/lambda"] for n in names}
        dampings = {n: float(tensors[f"{n}/damping"][0]) for n in names}
        return cls(eigens, lambdas, dampings)


def fit_curvature(model: nn.Module, units: list[Unit], batches: list[dict[str, Tensor]],
                  corrected: bool = True, fisher: str = DEFAULT_FISHER,
                  damping: DampingConfig = DampingConfig(), seed: int = 0,
                  logodds_cap: float = 1.0) -> Curvature:
    """Single-process fit: both passes over an in-memory list of batches."""
    if fisher not in FISHER_KINDS:
        raise UserError(f"influence.fisher={fisher!r}: expected one of {FISHER_KINDS}")
    check_logodds_cap(logodds_cap)
    stats = covariance_pass(model, units, batches, fisher, seed, logodds_cap)
    eigens = eigendecompose(stats, units)
    lam = (lambda_pass(model, units, eigens, batches, fisher, seed + 1, logodds_cap)
           if corrected else None)
    return Curvature.build(eigens, lam, corrected, damping)
