"""Greedy generation for evaluation and for observing a behaviour (batched, right-padded prompts)."""

from __future__ import annotations

import torch
from torch import nn

from operators.capture import eval_mode


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 24,
                    context: int | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, without the prompt), one at a time per row.

    Rows are decoded independently with the KV-cache-free loop: simple, exact, and cheap at the
    sizes evaluation uses. Generation stops at EOS or ``max_new_tokens``.
    """
    outputs = []
    with eval_mode(model):
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if context is not None:
                ids = ids[-(context - max_new_tokens):] if context > max_new_tokens else ids
            new: list[int] = []
            for _ in range(max_new_tokens):
                x = torch.tensor([ids + new])
                next_id = int(model(input_ids=x).logits[0, -1].argmax())
                if next_id == tokenizer.eos_token_id:
                    break
                new.append(next_id)
            outputs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    return outputs
