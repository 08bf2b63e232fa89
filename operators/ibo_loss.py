"""IBO's losses (LANCET.md section 5) and the baselines' objectives, per example.

    Δθ(z)  = log πθ(y|x) − log πθs(y|x)
    L_COR  = −E[ε · log σ(β Δθ(z−) − β Δθ(z+))]        z+ is DPO's "rejected", z− its "chosen"
    L_BR   = E_{z ∈ D_IF0}[mean_t KL(πθs(·|z<t) ‖ πθ(·|z<t))]
    L_IBO  = L_COR + γ · L_BR

At ``granularity=token`` (conf/ibo/ibo.yaml's choice) the rejected side's log-ratio is taken
per token, each against the chosen side's per-token mean, and the sigmoids are averaged over
z+'s tokens:

    L_COR_tok = −E[ε · mean_{t∈y+} log σ(β Δ̄θ(z−) − β Δθ,t(z+))]
    Δθ,t(z) = log πθ(y_t|x,y<t) − log πθs(y_t|x,y<t),   Δ̄θ(z) = mean_t Δθ,t(z)

Each token of z+ then saturates on its own: at sequence level the sum of log-ratios is driven
down by z+'s least certain tokens (its opening) and the loss fades while the tokens the model
is sure of (a memorised phrase) are never lowered; at token level those keep their weight
until they too fall below θs. β is then a per-token scale (sequence β ≈ token β / |y|).

With ``rejected_tokens=distinct`` (this config's default; conf/ibo/ibo.yaml sets ``all``, the
correction suite's choice) only the tokens of z+ that its z− lacks are
lowered (``distinct_tokens``): the ones the two answers share (punctuation, the end of turn,
common words, a shared opening) are not the behaviour, and lowering them in z+ lowered them
everywhere (docs/METHOD.md section 5). A z+ with no token of its own keeps all of them.

Unlearning baselines on the positive set D_IF+ (with γ · L_BR on D_IF0 as their retain term):

    L_NPO    = −(2/β) · log σ(−β · Δθ(z+))                        (Zhang et al. 2024)
    L_SimNPO = −(2/β) · log σ(−(β/|y|) · log πθ(y|x) − δ)         (Fan et al. 2024, no reference)

The reference distribution for L_BR may be stored as its top-k log-probs per token: the KL is
then taken over the k tokens plus one bucket for the rest of the mass (exact when k = |V|, a
lower bound otherwise by the data-processing inequality).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from operators.errors import UserError

GRANULARITIES = ("token", "sequence")
REJECTED_TOKENS = ("distinct", "all")


@dataclass(frozen=True)
class IBOLossConfig:
    """β scales the log-ratios, γ weighs the Bregman term, δ is SimNPO's reward margin;
    ``granularity`` (ibo's L_COR only): its log-ratios per token or per sequence;
    ``rejected_tokens`` (per token only): lower every token of z+ or those its z− lacks."""

    beta: float = 0.1
    gamma: float = 1.0
    delta: float = 0.0
    granularity: str = "sequence"
    rejected_tokens: str = "distinct"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise UserError(f"ibo.granularity={self.granularity!r}: expected one of "
                            f"{', '.join(GRANULARITIES)}")
        if self.rejected_tokens not in REJECTED_TOKENS:
            raise UserError(f"ibo.rejected_tokens={self.rejected_tokens!r}: expected one of "
                            f"{', '.join(REJECTED_TOKENS)}")
        if not self.beta > 0:
            raise UserError(f"ibo.beta={self.beta}: must be > 0")
        if not self.gamma >= 0:
            raise UserError(f"ibo.gamma={self.gamma}: must be >= 0")
        if not 0 <= self.delta < float("inf"):
            raise UserError(f"ibo.delta={self.delta}: must be finite and >= 0")


def correction_loss(policy_pos: Tensor, policy_neg: Tensor, ref_pos: Tensor, ref_neg: Tensor,
                    eps: Tensor, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair L_COR ``[P]`` and TRL-named metrics (z− = chosen, z+ = rejected)."""
    chosen = beta * (policy_neg - ref_neg)  # β Δθ(z−)
    rejected = beta * (policy_pos - ref_pos)  # β Δθ(z+)
    losses = -eps * F.logsigmoid(chosen - rejected)
    metrics = {"rewards/chosen": chosen.detach().mean(),
               "rewards/rejected": rejected.detach().mean(),
               "rewards/margins": (chosen - rejected).detach().mean(),
               "rewards/accuracies": (chosen > rejected).float().mean(),
               "logps/chosen": policy_neg.detach().mean(),
               "logps/rejected": policy_pos.detach().mean()}
    return losses, metrics


def token_correction_loss(policy_pos: Tensor, policy_neg: Tensor, ref_pos: Tensor,
                          ref_neg: Tensor, mask_pos: Tensor, mask_neg: Tensor, eps: Tensor,
                          beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair L_COR_tok ``[P]`` from token log-probs ``[P, T]`` and loss masks (z− = chosen).

    Args:
        policy_pos, ref_pos, mask_pos: z+'s token log-probs under πθ and θs and its loss mask;
            policy_neg, ref_neg, mask_neg: the same for z− (the two sides may differ in T).
    """
    mask_pos, mask_neg = mask_pos.bool(), mask_neg.bool()
    ratio_pos = torch.where(mask_pos, policy_pos - ref_pos, torch.zeros_like(policy_pos))
    ratio_neg = torch.where(mask_neg, policy_neg - ref_neg, torch.zeros_like(policy_neg))
    n_pos, n_neg = mask_pos.sum(1).clamp_min(1), mask_neg.sum(1).clamp_min(1)
    chosen = beta * ratio_neg.sum(1) / n_neg  # β Δ̄θ(z−)
    rejected = beta * ratio_pos  # β Δθ,t(z+)
    per_token = torch.where(mask_pos, F.logsigmoid(chosen[:, None] - rejected),
                            torch.zeros_like(rejected))
    losses = -eps * per_token.sum(1) / n_pos
    rejected_mean = rejected.sum(1) / n_pos
    metrics = {"rewards/chosen": chosen.detach().mean(),
               "rewards/rejected": rejected_mean.detach().mean(),
               "rewards/margins": (chosen - rejected_mean).detach().mean(),
               "rewards/accuracies": (chosen > rejected_mean).float().mean(),
               "rewards/rejected_tokens_below": ((chosen[:, None] > rejected) & mask_pos
                                                 ).sum().float() / n_pos.sum(),
               "logps/chosen": torch.where(mask_neg, policy_neg, 0).sum(1).detach().mean(),
               "logps/rejected": torch.where(mask_pos, policy_pos, 0).sum(1).detach().mean()}
    return losses, metrics


def distinct_tokens(pos_ids: Tensor, mask_pos: Tensor, neg_ids: Tensor, mask_neg: Tensor
                    ) -> Tensor:
    """z+'s loss mask ``[P, T+]`` without the tokens that also occur in its z−'s loss mask.

    A row whose every token also occurs in z− keeps its whole mask (its pair must still move).
    """
    mask_pos, mask_neg = mask_pos.bool(), mask_neg.bool()
    keep = torch.zeros_like(mask_pos)
    for i in range(pos_ids.shape[0]):  # one [T+, T−]-free membership test per pair
        shared = torch.isin(pos_ids[i], neg_ids[i][mask_neg[i]])
        own = mask_pos[i] & ~shared
        keep[i] = own if bool(own.any()) else mask_pos[i]
    return keep


def topk_reference(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The reference's top-k token log-probs and their indices ``[B, T, k]`` (k ≤ |V|)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return values, indices


def bregman_loss(policy_logits: Tensor, ref_logp: Tensor, ref_index: Tensor, token_mask: Tensor
                 ) -> Tensor:
    """Per-example L_BR ``[B]``: token-mean KL(πθs ‖ πθ) on the reference's top-k support.

    Args:
        policy_logits: ``[B, T, V]``; ref_logp, ref_index: ``[B, T, k]``; token_mask: ``[B, T]``.
    """
    logq = torch.log_softmax(policy_logits.float(), dim=-1).gather(-1, ref_index)
    p = ref_logp.exp()
    kl = (p * (ref_logp - logq)).sum(-1)
    rest_p = (1 - p.sum(-1)).clamp_min(0)
    rest_q = (1 - logq.exp().sum(-1)).clamp_min(1e-12)
    kl = kl + torch.where(rest_p > 1e-9, rest_p * (rest_p.clamp_min(1e-12).log() - rest_q.log()),
                          torch.zeros_like(rest_p))
    mask = token_mask.to(kl.dtype)
    return (kl * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def ascent_loss(policy_logp: Tensor, weights: Tensor | None = None) -> Tensor:
    """Gradient ascent on the likelihood (``ga``; ``pbo`` with influence weights): ``[B]``."""
    return policy_logp if weights is None else weights * policy_logp


def nll_loss(policy_logp: Tensor, tokens: Tensor) -> Tensor:
    """Plain fine-tuning (``remove``, ``oracle``): per-example NLL per token ``[B]``."""
    return -policy_logp / tokens.clamp_min(1)


def npo_loss(policy_logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """Per-example L_NPO ``[B]`` = (2/β) log(1 + (πθ/πθs)^β) on sequence log-probs ``[B]``.

    Its gradient is GA's weighted by 2σ(βΔθ): it fades as πθ(y|x) falls below θs's, which is
    what keeps NPO from collapsing the way plain ascent does.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (policy_logp - ref_logp))


def simnpo_loss(policy_logp: Tensor, tokens: Tensor, beta: float, delta: float = 0.0) -> Tensor:
    """Per-example L_SimNPO ``[B]``: NPO without a reference, on the length-normalised log-prob.

    Args:
        policy_logp: summed response log-probs ``[B]``; tokens: response lengths |y| ``[B]``.
    """
    return -(2.0 / beta) * F.logsigmoid(-(beta / tokens.clamp_min(1)) * policy_logp - delta)
