"""Sequences: (prompt, response) → token ids and masks; padded batches; sequence log-probs.

A sample z = (x, y) is encoded as ``x`` tokens then ``y`` tokens then EOS, or, for a tokenizer
with a chat template (``template="auto"``), as user/assistant turns (``operators/chat.py``).
``loss_mask[t] = 1`` marks the tokens the loss is taken on (the response and its EOS, or the
assistant turn, by default); they are predicted from position ``t - 1``. Batches are
right-padded, so real positions never see padding under a causal mask and every score is
independent of the batch it was computed in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from operators.chat import Turns, chat_split, keep_end, prompt_ids, uses_chat_template
from operators.errors import UserError


class SequenceTooLongError(UserError):
    """A sample does not fit the model's context and truncation is off."""


@dataclass(frozen=True)
class Encoded:
    """One tokenized sample."""

    input_ids: list[int]
    loss_mask: list[int]
    prompt_len: int
    truncated: bool


def encode(tokenizer, prompt: str, response: str, max_length: int, *,
           train_on_prompt: bool = False, truncate: bool = True, turns: Turns | None = None,
           template: str = "auto") -> Encoded:
    """Tokenize one sample; cut the response's end if it exceeds ``max_length`` (or refuse).

    ``plain`` (or a tokenizer without a chat template): prompt, then ``" " + response`` and EOS.
    ``auto`` with a chat template: ``turns`` (the conversation before the response; default one
    user turn holding ``prompt``) rendered with the generation prompt, then the assistant turn
    as the template closes it (no EOS added). BOS is prepended when the tokenizer adds one
    itself and the ids do not already start with it.
    """
    p_ids, r_ids = _split(tokenizer, prompt, response, turns, template)
    ids = p_ids + r_ids
    truncated = len(ids) > max_length
    if truncated and not truncate:
        raise SequenceTooLongError(
            f"{len(ids)} tokens exceed the context of {max_length}")
    if truncated and len(p_ids) >= max_length:
        p_ids = keep_end(tokenizer, p_ids, max_length - 1)  # and 1 response token
    ids = (p_ids + r_ids)[:max_length]
    mask = [int(train_on_prompt)] * len(p_ids) + [1] * (len(ids) - len(p_ids))
    mask[0] = 0  # the first token is never predicted
    return Encoded(ids, mask, len(p_ids), truncated)


def _split(tokenizer, prompt: str, response: str, turns: Turns | None, template: str
           ) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one sample."""
    if uses_chat_template(tokenizer, template):
        return chat_split(tokenizer, prompt, turns, response)
    p_ids = prompt_ids(tokenizer, prompt, template="plain")
    r_ids = tokenizer(" " + response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        r_ids = r_ids + [tokenizer.eos_token_id]
    return p_ids, r_ids


def collate(items: list[Encoded], pad_id: int, seeds: list[int] | None = None
            ) -> dict[str, Tensor]:
    """Right-pad a list of encoded samples into a batch.

    Args:
        seeds: optional per-sample seeds for Fisher label sampling (see ``sample_seed``), which
            make sampled curvature independent of how the corpus is sharded and batched.

    Returns:
        ``input_ids``, ``attention_mask``, ``loss_mask``: ``[B, T]`` int64;
        ``prompt_last``: ``[B]`` index of each sample's last prompt token;
        ``sample_seed``: ``[B]`` when ``seeds`` is given.
    """
    length = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    loss = torch.zeros((len(items), length), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        attention[row, :n] = 1
        loss[row, :n] = torch.tensor(item.loss_mask)
    prompt_last = torch.tensor([max(item.prompt_len - 1, 0) for item in items])
    batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss,
             "prompt_last": prompt_last}
    if seeds is not None:
        batch["sample_seed"] = torch.tensor(seeds, dtype=torch.long)
    return batch


def sample_seed(sample_id: str, salt: str = "") -> int:
    """A stable 62-bit seed for one sample (same on every worker and every run)."""
    digest = hashlib.sha256(f"{salt}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def token_log_probs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(token_t | tokens_<t) for t ≥ 1, aligned to positions: ``[B, T]`` (column 0 is 0)."""
    shifted = logits[:, :-1]
    if shifted.dtype in (torch.float16, torch.bfloat16):
        shifted = shifted.float()  # log-softmax in half precision loses the tail
    logp = torch.log_softmax(shifted, dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return F.pad(picked, (1, 0))


def sequence_log_probs(logits: Tensor, input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """log p(y | x) summed over the masked tokens: ``[B]``."""
    return _masked_sum(token_log_probs(logits, input_ids), loss_mask)


def sample_labels(logits: Tensor, generator: torch.Generator | None = None,
                  seeds: Tensor | None = None) -> Tensor:
    """Labels drawn from the model's own predictive distribution (true Fisher): ``[B, T]``.

    Position t holds a token sampled from p(· | tokens_<t); column 0 is unused. Sampling is by
    inverse CDF: uniforms come from a CPU generator (per row from ``seeds`` ``[B]``, so a
    sample's labels depend neither on its batch nor on its shard nor on the device), the CDF is
    built one row at a time on the logits' device (``[T, V]``, never ``[B, T, V]`` in float64).
    """
    rows, length = logits.shape[0], logits.shape[1] - 1
    if seeds is None:
        uniforms = torch.rand(rows, length, generator=generator, dtype=torch.float64)
    else:
        uniforms = torch.stack([torch.rand(length, dtype=torch.float64, generator=torch.Generator()
                                           .manual_seed(int(seed))) for seed in seeds.tolist()])
    uniforms = uniforms.to(logits.device)
    drawn = torch.stack([_inverse_cdf(logits[b, :-1], uniforms[b]) for b in range(rows)])
    return F.pad(drawn, (1, 0))


def _inverse_cdf(logits: Tensor, uniforms: Tensor) -> Tensor:
    """One token per position from ``softmax(logits [T, V])`` at quantiles ``uniforms [T]``."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    cdf = torch.softmax(logits.detach().to(dtype), dim=-1).cumsum(dim=-1)
    target = (uniforms.to(dtype) * cdf[:, -1]).unsqueeze(-1)
    drawn = torch.searchsorted(cdf, target).squeeze(-1)
    return drawn.clamp_max(logits.shape[-1] - 1)


def sequence_losses(model, batch: dict[str, Tensor], *, sampled: bool = False,
                    generator: torch.Generator | None = None, logodds_cap: float = 1.0) -> Tensor:
    """Per-sequence −log p over the loss mask, with data labels or labels sampled from the model.

    ``logodds_cap`` c weighs each token's term by min(1 / (1 − p), c), the weight held constant
    (no gradient through it): the token's gradient is then min(1, c (1 − p)) times that of its
    log-odds log(p / (1 − p)), which does not vanish as p → 1 (``influence.logodds_cap``). c = 1
    is the plain −log p that every other caller (perplexity, the correction's losses) uses.

    Returns:
        ``[B]`` losses; their sum's gradient holds every sequence's gradient separately.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = (sample_labels(logits, generator, batch.get("sample_seed")) if sampled
              else batch["input_ids"])
    picked = token_log_probs(logits, labels)
    if logodds_cap != 1.0:
        picked = picked * logodds_weights(picked, logodds_cap)
    return -_masked_sum(picked, batch["loss_mask"])


def logodds_weights(log_probs: Tensor, cap: float) -> Tensor:
    """min(1 / (1 − p), ``cap``) per token, without gradient: ``[B, T]`` (1 − p as −expm1(log p),
    exact for p near 1)."""
    surprise = torch.expm1(log_probs.detach()).abs()  # 1 − p ≥ 0 (p = 1 gives 0: weight cap)
    return surprise.reciprocal().clamp(max=cap).nan_to_num(nan=cap)


def _masked_sum(values: Tensor, loss_mask: Tensor) -> Tensor:
    return torch.where(loss_mask.bool(), values, torch.zeros_like(values)).sum(dim=1)
