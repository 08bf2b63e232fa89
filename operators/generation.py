"""Greedy generation for evaluation and for observing a behaviour: ``model.generate`` with its
KV cache, batched and left-padded, every prompt formatted as ``encode`` formats it (chat
template or plain) and cut to fit the model's context."""

from __future__ import annotations

import logging

import torch
from torch import nn

from operators.capture import eval_mode
from operators.chat import Turns, keep_end, prompt_ids

log = logging.getLogger(__name__)


def context_limit(model: nn.Module, context: int | None = None) -> int | None:
    """Positions the model can attend over: the smallest of its config's and ``context``."""
    config = getattr(model, "config", None)
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions")]
    limits = [int(x) for x in limits + [context] if isinstance(x, int) and x > 0]
    return min(limits) if limits else None


def fit_budget(limit: int | None, max_new_tokens: int) -> tuple[int | None, int]:
    """(prompt tokens kept, new tokens) so that prompt + generation fit ``limit`` positions."""
    if limit is None:
        return None, max_new_tokens
    new = min(max_new_tokens, max(limit - 1, 1))  # at least one prompt token
    if new < max_new_tokens:
        log.warning("max_new_tokens=%d does not fit the model's %d positions: generating %d",
                    max_new_tokens, limit, new)
    return limit - new, new


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 24,
                    context: int | None = None, *, turns: list[Turns | None] | None = None,
                    template: str = "auto", batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, without the prompt, stripped).

    Prompt + generation never exceed the model's positions (``context_limit``): a longer
    prompt keeps its end (and BOS), a warning says how many were cut. Generation stops at EOS
    (the tokenizer's or the model's generation config's, e.g. a chat end-of-turn token) or
    after ``max_new_tokens``.

    Args:
        turns: per prompt, the conversation before the response (None: one user turn).
        template: ``auto`` (the tokenizer's chat template when it has one) or ``plain``.
    """
    keep, new = fit_budget(context_limit(model, context), max_new_tokens)
    turns = turns or [None] * len(prompts)
    ids = [prompt_ids(tokenizer, p, turns=t, template=template) for p, t in zip(prompts, turns)]
    cut = sum(keep is not None and len(x) > keep for x in ids)
    if cut:
        log.warning("%d of %d prompts exceed %d tokens: keeping their end", cut, len(ids), keep)
        ids = [keep_end(tokenizer, x, keep) for x in ids]
    outputs: list[str] = []
    with eval_mode(model):
        for start in range(0, len(ids), batch_size):
            outputs += _generate(model, tokenizer, ids[start:start + batch_size], new)
    return outputs


def _stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (chat end-of-turn tokens)."""
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None)
    found = found if isinstance(found, list) else [found]
    ids = [tokenizer.eos_token_id] + found
    return list(dict.fromkeys(int(x) for x in ids if x is not None))


def _generate(model: nn.Module, tokenizer, ids: list[list[int]], new: int) -> list[str]:
    """One left-padded batch through ``model.generate``: ``[B, T]`` prompts → texts."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    length = max(len(x) for x in ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (length - len(x)) + x for x in ids], device=device)
    attention = torch.tensor([[0] * (length - len(x)) + [1] * len(x) for x in ids],
                             device=device)
    stop = _stop_ids(model, tokenizer)
    out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=new,
                         do_sample=False, num_beams=1, use_cache=True, pad_token_id=pad,
                         eos_token_id=stop or None)
    texts = []
    for row in out[:, length:].tolist():
        end = next((i for i, t in enumerate(row) if t in stop), len(row))
        texts.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    return texts
