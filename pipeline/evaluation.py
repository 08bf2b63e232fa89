"""Before/after behaviour and utility of a model (CONTRACT.md section 5)."""

from __future__ import annotations

import torch

from operators.generation import greedy_generate
from operators.metrics import distinct_n, perplexity
from operators.sequences import collate, encode, sequence_losses
from pipeline.judge import Judge


@torch.no_grad()
def clean_perplexity(model, tokenizer, rows: list[dict], max_length: int, batch: int = 16
                     ) -> float:
    """Perplexity of the responses of ``rows`` (clean held-out samples)."""
    nll, tokens = 0.0, 0
    model.eval()
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        enc = [encode(tokenizer, r["prompt"], r["response"], max_length) for r in chunk]
        b = collate(enc, tokenizer.pad_token_id)
        nll += float(sequence_losses(model, b).sum())
        tokens += int(b["loss_mask"].sum())
    return perplexity(nll, tokens)


def behaviour(model, tokenizer, prompts: list[dict], judge: Judge, max_new_tokens: int,
              context: int) -> dict:
    """Undesirable rate on seen and unseen prompts, distinct-2, and the generations."""
    texts = greedy_generate(model, tokenizer, [p["prompt"] for p in prompts], max_new_tokens,
                            context)
    flags = judge.flags(texts)
    out = {"generations": [{**p, "generation": t, "flagged": f}
                           for p, t, f in zip(prompts, texts, flags)],
           "distinct2": distinct_n(texts, 2)}
    for split in ("seen", "unseen"):
        chosen = [f for p, f in zip(prompts, flags) if p.get("split", "seen") == split]
        out[f"rate_{split}"] = sum(chosen) / len(chosen) if chosen else float("nan")
    return out
