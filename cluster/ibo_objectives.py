"""The per-step objective of each correction method, and the frozen reference's cached outputs.

The reference (θs) is evaluated once, before training, on this worker's rows: sequence log-probs
of both sides of every pair, and top-k token log-probs of the neutral samples. With
``precompute_reference=False`` a frozen copy of θs runs at every step instead (for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from cluster.batches import TURNS, TokenizeConfig, to_tensors
from operators.ibo_loss import (
    IBOLossConfig,
    ascent_loss,
    bregman_loss,
    correction_loss,
    nll_loss,
    topk_reference,
)
from operators.sequences import sequence_log_probs

IBO_METHODS = ("ibo", "pbo", "ga", "remove", "oracle")
# Which datasets (written by the select stage) each method reads.
METHOD_DATASETS = {"ibo": ("pairs", "neutral"), "pbo": ("positive", "neutral"),
                   "ga": ("positive",), "remove": ("retain",), "oracle": ("clean",)}


@dataclass(frozen=True)
class ObjectiveConfig:
    """What one step optimises."""

    method: str = "ibo"
    loss: IBOLossConfig = field(default_factory=IBOLossConfig)
    bregman_topk: int = 64
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)

    def __post_init__(self) -> None:
        if self.method not in IBO_METHODS:
            raise ValueError(f"ibo.method={self.method!r}: expected one of {IBO_METHODS}")
        if int(self.bregman_topk) < 1:
            raise ValueError(f"ibo.bregman_topk={self.bregman_topk}: must be >= 1")


def side(rows: list[dict], prefix: str = "") -> dict[str, np.ndarray]:
    """Columns id/prompt/response (and prompt_turns) of ``rows`` (pairs: ``prefix`` = ``pos_``
    or ``neg_``)."""
    cols = {k: np.array([str(r[prefix + k]) for r in rows], dtype=object)
            for k in ("id", "prompt", "response")}
    if any(prefix + TURNS in r for r in rows):
        cols[TURNS] = np.array([r.get(prefix + TURNS) for r in rows], dtype=object)
    return cols


def _logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _seq_logp(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return sequence_log_probs(_logits(model, batch).float(), batch["input_ids"],
                              batch["loss_mask"])


class Reference:
    """θs's outputs for a list of rows, cached once (or computed live by a frozen model)."""

    def __init__(self, model: nn.Module, tokenizer, config: ObjectiveConfig, live: bool):
        self.model, self.tokenizer, self.config, self.live = model, tokenizer, config, live
        self.cache: dict[tuple[str, str], object] = {}

    def _batch(self, cols, device):
        return to_tensors(cols, self.tokenizer, self.config.tokenize, device)

    @torch.no_grad()
    def precompute(self, datasets: dict[str, list[dict]], device: str, size: int = 16) -> None:
        """Fill the cache for every row this worker will train on."""
        for name, rows in datasets.items():
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                for prefix in (("pos_", "neg_") if name == "pairs" else ("",)):
                    self._fill(chunk, prefix, name == "neutral", device)

    def _fill(self, rows, prefix, topk: bool, device) -> None:
        cols = side(rows, prefix)
        batch = self._batch(cols, device)
        logits = _logits(self.model, batch)
        if topk:
            values, index = topk_reference(logits, self.config.bregman_topk)
            lengths = batch["attention_mask"].sum(1).tolist()
            for i, sample_id in enumerate(cols["id"]):
                n = int(lengths[i])  # stored unpadded: training batches pad differently
                self.cache[("topk", sample_id)] = (values[i, :n].cpu(), index[i, :n].cpu())
        else:
            logp = sequence_log_probs(logits.float(), batch["input_ids"], batch["loss_mask"])
            for i, sample_id in enumerate(cols["id"]):
                self.cache[("logp", sample_id)] = float(logp[i])

    def seq_logp(self, cols, batch) -> Tensor:
        if self.live:
            with torch.no_grad():
                return _seq_logp(self.model, batch)
        return torch.tensor([self.cache[("logp", i)] for i in cols["id"]],
                            device=batch["input_ids"].device)

    def topk(self, cols, batch) -> tuple[Tensor, Tensor]:
        if self.live:
            with torch.no_grad():
                return topk_reference(_logits(self.model, batch), self.config.bregman_topk)
        length = batch["input_ids"].shape[1]
        device = batch["input_ids"].device

        def padded(t: Tensor) -> Tensor:  # padding positions are masked out of the KL
            return torch.nn.functional.pad(t, (0, 0, 0, length - t.shape[0]))

        values = [padded(self.cache[("topk", i)][0]) for i in cols["id"]]
        index = [padded(self.cache[("topk", i)][1]) for i in cols["id"]]
        return torch.stack(values).to(device), torch.stack(index).to(device)


def step_loss(model: nn.Module, tokenizer, ref: Reference | None, rows: dict[str, list[dict]],
              config: ObjectiveConfig, device: str) -> tuple[Tensor, dict[str, float]]:
    """The loss of one step of ``config.method`` on this worker's rows, and its metrics."""

    def batch_of(cols):
        return to_tensors(cols, tokenizer, config.tokenize, device)

    metrics: dict[str, float] = {}
    loss = torch.zeros((), device=device)
    if config.method == "ibo":
        pos_cols, neg_cols = side(rows["pairs"], "pos_"), side(rows["pairs"], "neg_")
        pos, neg = batch_of(pos_cols), batch_of(neg_cols)
        eps = torch.tensor([float(r["eps"]) for r in rows["pairs"]], device=device)
        cor, m = correction_loss(_seq_logp(model, pos), _seq_logp(model, neg),
                                 ref.seq_logp(pos_cols, pos), ref.seq_logp(neg_cols, neg),
                                 eps, config.loss.beta)
        loss = loss + cor.mean()
        metrics.update({k: float(v) for k, v in m.items()})
        metrics["loss/cor"] = cor.mean().item()
    if config.method in ("pbo", "ga"):
        cols = side(rows["positive"])
        batch = batch_of(cols)
        tokens = batch["loss_mask"].sum(1)
        logp = _seq_logp(model, batch) / tokens.clamp_min(1)
        weights = (torch.tensor([float(r["weight"]) for r in rows["positive"]], device=device)
                   if config.method == "pbo" else None)
        ascent = ascent_loss(logp, weights).mean()
        loss = loss + ascent
        metrics["loss/ascent"] = ascent.item()
    if config.method in ("ibo", "pbo") and config.loss.gamma > 0:
        cols = side(rows["neutral"])
        batch = batch_of(cols)
        ref_logp, ref_index = ref.topk(cols, batch)
        br = bregman_loss(_logits(model, batch), ref_logp, ref_index, batch["attention_mask"])
        loss = loss + config.loss.gamma * br.mean()
        metrics["loss/bregman"] = br.mean().item()
    if config.method in ("remove", "oracle"):
        name = "retain" if config.method == "remove" else "clean"
        batch = batch_of(side(rows[name]))
        nll = nll_loss(_seq_logp(model, batch), batch["loss_mask"].sum(1)).mean()
        loss = loss + nll
        metrics["loss/nll"] = nll.item()
    metrics["loss"] = loss.item()
    return loss, metrics
