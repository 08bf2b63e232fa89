"""The correction objectives, as a registry, and the frozen reference's cached outputs.

Each method (``ibo.method``) is one ``Objective``: the select-stage datasets it reads, which of
them the frozen reference θs must be evaluated on (sequence log-probs, top-k token log-probs),
and its loss as a sum of terms. Adding a method is one ``register(Objective(...))`` here plus
its ``conf/ibo/<name>.yaml``: the config check, the job, the reference and the correct stage
read the registry. The loss math itself lives in ``operators/ibo_loss.py``.

The frozen reference's outputs are ``cluster.ibo_reference.Reference``'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from cluster.batches import TokenizeConfig, to_tensors
from cluster.ibo_reference import Reference, logits_of, seq_logp_of, side, token_logp_of
from operators.errors import UserError
from operators.ibo_loss import (
    IBOLossConfig,
    ascent_loss,
    bregman_loss,
    correction_loss,
    distinct_tokens,
    nll_loss,
    npo_loss,
    simnpo_loss,
    token_correction_loss,
)

__all__ = ["OBJECTIVES", "Objective", "ObjectiveConfig", "Reference", "Step", "get_objective",
           "register", "side", "step_loss"]


@dataclass(frozen=True)
class ObjectiveConfig:
    """What one step optimises: ``method`` names a registered ``Objective``."""

    method: str = "ibo"
    loss: IBOLossConfig = field(default_factory=IBOLossConfig)
    bregman_topk: int = 64
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)

    def __post_init__(self) -> None:
        get_objective(self.method)  # an unknown method fails here, naming the key
        if int(self.bregman_topk) < 1:
            raise UserError(f"ibo.bregman_topk={self.bregman_topk}: must be >= 1")

    @property
    def objective(self) -> Objective:
        return get_objective(self.method)


@dataclass
class Step:
    """What a loss term sees in one step: the policy, the reference, this worker's rows."""

    model: nn.Module
    tokenizer: object
    ref: Reference | None
    rows: dict[str, list[dict]]
    config: ObjectiveConfig
    device: str

    def batch(self, cols: dict[str, np.ndarray]) -> dict[str, Tensor]:
        return to_tensors(cols, self.tokenizer, self.config.tokenize, self.device)

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        return logits_of(self.model, batch)

    def seq_logp(self, batch: dict[str, Tensor]) -> Tensor:
        return seq_logp_of(self.model, batch)

    def token_logp(self, batch: dict[str, Tensor]) -> Tensor:
        return token_logp_of(self.model, batch)


# A term returns its (already weighted) scalar loss and its metrics, or None when it is off.
Term = Callable[[Step], "tuple[Tensor, dict[str, float]] | None"]


@dataclass(frozen=True)
class Objective:
    """One correction method.

    Attributes:
        name: the ``ibo.method`` value.
        datasets: the select-stage datasets (``scores/select/<name>.parquet``) it reads.
        terms: summed, in order, into the step's loss.
        reference_logp: datasets on which it reads θs's sequence log-probs.
        reference_topk: datasets on which it reads θs's top-k token log-probs (the KL term).
        summary: one line for the docs and errors.
    """

    name: str
    datasets: tuple[str, ...]
    terms: tuple[Term, ...]
    reference_logp: tuple[str, ...] = ()
    reference_topk: tuple[str, ...] = ()
    summary: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.reference_logp + self.reference_topk) - set(self.datasets)
        if unknown:
            raise ValueError(f"objective {self.name}: reads the reference on {sorted(unknown)} "
                             "but not those datasets")

    @property
    def needs_reference(self) -> bool:
        return bool(self.reference_logp or self.reference_topk)


OBJECTIVES: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Add a method to the registry (its name must be new)."""
    if objective.name in OBJECTIVES:
        raise UserError(f"ibo.method={objective.name!r} is already registered")
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise UserError(f"ibo.method={name!r}: expected one of {tuple(OBJECTIVES)}")
    return OBJECTIVES[name]


def step_loss(model: nn.Module, tokenizer, ref: Reference | None, rows: dict[str, list[dict]],
              config: ObjectiveConfig, device: str) -> tuple[Tensor, dict[str, float]]:
    """The loss of one step of ``config.method`` on this worker's rows, and its metrics."""
    step = Step(model, tokenizer, ref, rows, config, device)
    metrics: dict[str, float] = {}
    loss = torch.zeros((), device=device)
    for term in config.objective.terms:
        out = term(step)
        if out is not None:
            loss = loss + out[0]
            metrics.update(out[1])
    metrics["loss"] = loss.item()
    return loss, metrics


# ---- the terms (each a few lines around one function of operators/ibo_loss.py) ----

def pairwise_term(step: Step):
    """IBO's L_COR on the (z+, z−) pairs, ε-weighted, per token or per sequence."""
    rows = step.rows["pairs"]
    pos_cols, neg_cols = side(rows, "pos_"), side(rows, "neg_")
    pos, neg = step.batch(pos_cols), step.batch(neg_cols)
    eps = torch.tensor([float(r["eps"]) for r in rows], device=step.device)
    beta = step.config.loss.beta
    if step.config.loss.granularity == "token":
        mask_pos = pos["loss_mask"]
        if step.config.loss.rejected_tokens == "distinct":
            mask_pos = distinct_tokens(pos["input_ids"], mask_pos, neg["input_ids"],
                                       neg["loss_mask"])
        cor, m = token_correction_loss(
            step.token_logp(pos), step.token_logp(neg), step.ref.token_logp(pos_cols, pos),
            step.ref.token_logp(neg_cols, neg), mask_pos, neg["loss_mask"], eps, beta)
        m["rewards/rejected_tokens_lowered"] = (mask_pos.bool().sum() /
                                                pos["loss_mask"].bool().sum().clamp_min(1))
    else:
        cor, m = correction_loss(step.seq_logp(pos), step.seq_logp(neg),
                                 step.ref.seq_logp(pos_cols, pos),
                                 step.ref.seq_logp(neg_cols, neg), eps, beta)
    metrics = {k: float(v) for k, v in m.items()}
    metrics["loss/cor"] = cor.mean().item()
    return cor.mean(), metrics


def _ascent(step: Step, weighted: bool):
    """Gradient ascent on D_IF+'s token-mean log-prob (``weighted``: by influence, ``pbo``)."""
    rows = step.rows["positive"]
    batch = step.batch(side(rows))
    logp = step.seq_logp(batch) / batch["loss_mask"].sum(1).clamp_min(1)
    weights = (torch.tensor([float(r["weight"]) for r in rows], device=step.device)
               if weighted else None)
    ascent = ascent_loss(logp, weights).mean()
    return ascent, {"loss/ascent": ascent.item()}


def ascent_term(step: Step):
    return _ascent(step, weighted=False)


def weighted_ascent_term(step: Step):
    return _ascent(step, weighted=True)


def npo_term(step: Step):
    """NPO on D_IF+ against θs's sequence log-probs."""
    cols = side(step.rows["positive"])
    batch = step.batch(cols)
    logp = step.seq_logp(batch)
    npo = npo_loss(logp, step.ref.seq_logp(cols, batch), step.config.loss.beta).mean()
    return npo, {"loss/npo": npo.item(), "logps/forget": logp.detach().mean().item()}


def simnpo_term(step: Step):
    """SimNPO on D_IF+: length-normalised, no reference."""
    batch = step.batch(side(step.rows["positive"]))
    logp = step.seq_logp(batch)
    loss = step.config.loss
    simnpo = simnpo_loss(logp, batch["loss_mask"].sum(1), loss.beta, loss.delta).mean()
    return simnpo, {"loss/simnpo": simnpo.item(), "logps/forget": logp.detach().mean().item()}


def bregman_term(step: Step):
    """γ · L_BR: the KL to θs's top-k distribution on the neutral set (off at γ = 0)."""
    gamma = step.config.loss.gamma
    if gamma <= 0:
        return None
    cols = side(step.rows["neutral"])
    batch = step.batch(cols)
    ref_logp, ref_index = step.ref.topk(cols, batch)
    br = bregman_loss(step.logits(batch), ref_logp, ref_index, batch["attention_mask"])
    return gamma * br.mean(), {"loss/bregman": br.mean().item()}


def _nll(step: Step, name: str):
    batch = step.batch(side(step.rows[name]))
    nll = nll_loss(step.seq_logp(batch), batch["loss_mask"].sum(1)).mean()
    return nll, {"loss/nll": nll.item()}


def retain_nll_term(step: Step):
    return _nll(step, "retain")


def clean_nll_term(step: Step):
    return _nll(step, "clean")


# ---- the registry: one entry per ibo.method (and one conf/ibo/<name>.yaml each) ----

register(Objective("ibo", ("pairs", "neutral"), (pairwise_term, bregman_term),
                   reference_logp=("pairs",), reference_topk=("neutral",),
                   summary="pairwise L_COR on (z+, z−) + γ·KL on D_IF0"))
register(Objective("pbo", ("positive", "neutral"), (weighted_ascent_term, bregman_term),
                   reference_topk=("neutral",),
                   summary="influence-weighted gradient ascent on D_IF+ + γ·KL on D_IF0"))
register(Objective("ga", ("positive",), (ascent_term,),
                   summary="gradient ascent on D_IF+"))
register(Objective("ga_kl", ("positive", "neutral"), (ascent_term, bregman_term),
                   reference_topk=("neutral",),
                   summary="gradient ascent on D_IF+ + γ·KL on D_IF0"))
register(Objective("npo", ("positive", "neutral"), (npo_term, bregman_term),
                   reference_logp=("positive",), reference_topk=("neutral",),
                   summary="NPO on D_IF+ + γ·KL on D_IF0"))
register(Objective("simnpo", ("positive", "neutral"), (simnpo_term, bregman_term),
                   reference_topk=("neutral",),
                   summary="SimNPO on D_IF+ (no reference) + γ·KL on D_IF0"))
register(Objective("remove", ("retain",), (retain_nll_term,),
                   summary="fine-tune on D without D_IF+"))
register(Objective("oracle", ("clean",), (clean_nll_term,),
                   summary="retrain on the truly clean data (demo: needs ground truth)"))
