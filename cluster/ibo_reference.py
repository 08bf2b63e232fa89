"""The frozen reference θs's outputs that the correction objectives read.

θs is evaluated once, before training, on this worker's rows: sequence log-probs and/or top-k
token log-probs of the datasets an ``Objective`` names (``cluster/ibo_objectives.py``). With
``precompute_reference=False`` a frozen copy of θs runs at every step instead (for comparison).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from cluster.batches import TURNS, to_tensors
from operators.ibo_loss import topk_reference
from operators.sequences import sequence_log_probs, token_log_probs

if TYPE_CHECKING:
    from cluster.ibo_objectives import ObjectiveConfig


def side(rows: list[dict], prefix: str = "") -> dict[str, np.ndarray]:
    """Columns id/prompt/response (and prompt_turns) of ``rows`` (pairs: ``prefix`` = ``pos_``
    or ``neg_``)."""
    cols = {k: np.array([str(r[prefix + k]) for r in rows], dtype=object)
            for k in ("id", "prompt", "response")}
    if any(prefix + TURNS in r for r in rows):
        cols[TURNS] = np.array([r.get(prefix + TURNS) for r in rows], dtype=object)
    return cols


def logits_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def token_logp_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """log p(token_t | tokens_<t) ``[B, T]`` (mask with ``batch["loss_mask"]``)."""
    return token_log_probs(logits_of(model, batch).float(), batch["input_ids"])


def seq_logp_of(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return sequence_log_probs(logits_of(model, batch).float(), batch["input_ids"],
                              batch["loss_mask"])


class Reference:
    """θs's outputs for a list of rows, cached once (or computed live by a frozen model)."""

    def __init__(self, model: nn.Module, tokenizer, config: ObjectiveConfig, live: bool):
        self.model, self.tokenizer, self.config, self.live = model, tokenizer, config, live
        self.cache: dict[tuple[str, str], object] = {}

    def _batch(self, cols, device):
        return to_tensors(cols, self.tokenizer, self.config.tokenize, device)

    @torch.no_grad()
    def precompute(self, datasets: dict[str, list[dict]], device: str, logp: tuple[str, ...] = (),
                   topk: tuple[str, ...] = (), size: int = 16) -> None:
        """Fill the cache for every row this worker will train on: sequence log-probs of the
        datasets named in ``logp`` (both sides of ``pairs``), top-k log-probs of ``topk``'s."""
        for name, rows in datasets.items():
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                if name in logp:
                    for prefix in (("pos_", "neg_") if name == "pairs" else ("",)):
                        self._fill(chunk, prefix, False, device)
                if name in topk:
                    self._fill(chunk, "", True, device)

    def _fill(self, rows, prefix, topk: bool, device) -> None:
        cols = side(rows, prefix)
        batch = self._batch(cols, device)
        logits = logits_of(self.model, batch)
        if topk:
            values, index = topk_reference(logits, self.config.bregman_topk)
            lengths = batch["attention_mask"].sum(1).tolist()
            for i, sample_id in enumerate(cols["id"]):
                n = int(lengths[i])  # stored unpadded: training batches pad differently
                self.cache[("topk", sample_id)] = (values[i, :n].cpu(), index[i, :n].cpu())
        else:  # the tokens' log-probs (unpadded, as for top-k) and their masked sum
            tokens = token_log_probs(logits.float(), batch["input_ids"])
            logp = torch.where(batch["loss_mask"].bool(), tokens, torch.zeros_like(tokens)).sum(1)
            lengths = batch["attention_mask"].sum(1).tolist()
            for i, sample_id in enumerate(cols["id"]):
                self.cache[("logp", sample_id)] = float(logp[i])
                self.cache[("tokens", sample_id)] = tokens[i, :int(lengths[i])].cpu()

    def seq_logp(self, cols, batch) -> Tensor:
        if self.live:
            with torch.no_grad():
                return seq_logp_of(self.model, batch)
        return torch.tensor([self.cache[("logp", i)] for i in cols["id"]],
                            device=batch["input_ids"].device)

    def token_logp(self, cols, batch) -> Tensor:
        """θs's token log-probs ``[B, T]`` at ``batch``'s padding (zeros past each row)."""
        if self.live:
            with torch.no_grad():
                return token_logp_of(self.model, batch)
        length = batch["input_ids"].shape[1]
        rows = [_pad_rows(self.cache[("tokens", i)], length) for i in cols["id"]]
        return torch.stack(rows).to(batch["input_ids"].device)

    def topk(self, cols, batch) -> tuple[Tensor, Tensor]:
        if self.live:
            with torch.no_grad():
                return topk_reference(logits_of(self.model, batch), self.config.bregman_topk)
        length = batch["input_ids"].shape[1]
        device = batch["input_ids"].device
        values = [_pad_rows(self.cache[("topk", i)][0], length) for i in cols["id"]]
        index = [_pad_rows(self.cache[("topk", i)][1], length) for i in cols["id"]]
        return torch.stack(values).to(device), torch.stack(index).to(device)


def _pad_rows(t: Tensor, length: int) -> Tensor:
    """A cached unpadded row ``[n, …]`` zero-padded to ``length`` positions (masked out later)."""
    return torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, length - t.shape[0]))
