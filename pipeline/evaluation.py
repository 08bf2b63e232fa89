"""Before/after behaviour and utility of a model (CONTRACT.md section 5).

The models' work (generation, perplexity) runs in ``cluster.eval_job`` on a Ray worker; here the
judge turns generations into rates. ``behaviour`` and ``clean_perplexity`` also run a model
in-process, for tests and benchmarks.
"""

from __future__ import annotations

from cluster import eval_job
from cluster.batches import TokenizeConfig
from operators.generation import greedy_generate
from operators.metrics import distinct_n
from pipeline.judge import Judge


def clean_perplexity(model, tokenizer, rows: list[dict], max_length: int, batch: int = 16,
                     template: str = "auto") -> float:
    """Perplexity of the responses of ``rows`` (clean held-out samples)."""
    config = TokenizeConfig(max_length=max_length, template=template)
    return eval_job.clean_perplexity(model, tokenizer, rows, config, batch)


def judged(prompts: list[dict], texts: list[str], judge: Judge) -> dict:
    """Undesirable rate on seen and unseen prompts, distinct-2, and the judged generations."""
    flags = judge.flags(texts)
    out = {"generations": [{**p, "generation": t, "flagged": f}
                           for p, t, f in zip(prompts, texts, flags)],
           "distinct2": distinct_n(texts, 2)}
    for split in ("seen", "unseen"):  # no split (absent, or null beside rows that have one): seen
        chosen = [f for p, f in zip(prompts, flags) if (p.get("split") or "seen") == split]
        out[f"rate_{split}"] = sum(chosen) / len(chosen) if chosen else float("nan")
    return out


def behaviour(model, tokenizer, prompts: list[dict], judge: Judge, max_new_tokens: int,
              context: int, template: str = "auto") -> dict:
    """``judged`` generations of an in-process model."""
    texts = greedy_generate(model, tokenizer, [p["prompt"] for p in prompts], max_new_tokens,
                            context, template=template)
    return judged(prompts, texts, judge)
