"""Head-averaged attention probabilities without eager attention (LANCET.md section 2).

LinFAC's attention unit mixes its input over tokens with ā, the causal attention probabilities
averaged over heads. Eager attention exposes them, but it materialises ``[B, H, T, T]`` with
its softmax's backward graph and gives up SDPA/flash kernels for the whole pass (19-29% of
bf16 throughput at 1.1B). The unit only needs ā, and κ is treated as constant (no gradient
flows through it), so the output keeps the fast kernel and ā is recomputed beside it from the
same queries and keys, under ``no_grad``, a few heads at a time: at most ``[B, chunk, T, T]``
scores exist at once and nothing is kept for backward.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def head_averaged_probs(query: Tensor, key: Tensor, mask: Tensor | None, scaling: float | None,
                        softcap: float | None = None, chunk: int = 4) -> Tensor:
    """ā = mean over heads of softmax(q kᵀ · scaling + mask): ``[B, Tq, Tk]``.

    Args:
        query: ``[B, H, Tq, D]``; key: ``[B, Hkv, Tk, D]`` with ``H`` a multiple of ``Hkv``
            (grouped-query attention shares each key head among ``H / Hkv`` query heads).
        mask: boolean (True = attend) or additive float, broadcastable to ``[B, H, Tq, Tk]``;
            None means plain causal attention (SDPA's ``is_causal`` case).
        scaling: the score scale (``D ** -0.5`` when None).
        softcap: Gemma-style ``softcap · tanh(s / softcap)`` on the scores, when set.

    Computed in float32 (float64 for float64 inputs); rows with every key masked give zeros.
    """
    heads, groups = query.shape[1], query.shape[1] // key.shape[1]
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    allowed = _allowed(mask, query.shape[2], key.shape[2], query.device)
    total = torch.zeros(query.shape[0], query.shape[2], key.shape[2], dtype=dtype,
                        device=query.device)
    for start in range(0, heads, chunk):
        index = torch.arange(start, min(start + chunk, heads), device=query.device)
        scores = query[:, index].to(dtype) @ key[:, index // groups].to(dtype).mT * scaling
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        if mask is not None and mask.dtype != torch.bool:
            scores = scores + mask.to(dtype)
        scores = scores.masked_fill(~allowed, float("-inf"))
        total += torch.softmax(scores, dim=-1).nan_to_num(0.0).sum(dim=1)
    return total / heads


def _allowed(mask: Tensor | None, q_len: int, k_len: int, device) -> Tensor:
    """Boolean attend-mask: the given one, or causal (aligned to the last keys) when None."""
    if mask is not None and mask.dtype == torch.bool:
        return mask
    rows = torch.arange(q_len, device=device).unsqueeze(1) + (k_len - q_len)
    return torch.arange(k_len, device=device).unsqueeze(0) <= rows
