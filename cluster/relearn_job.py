"""Relearning: how fast a corrected model's behaviour comes back (issue #15).

Unlearning methods are known to return after a few steps of fine-tuning on related data. This
fine-tunes the corrected model with plain NLL on the top positive-influence samples (the data
that taught the behaviour) and generates on the harmful evaluation prompts after each k of
``steps`` (cumulative: k = 10 then 40 more for k = 50). It is a measurement, not a product step:
one Ray task, a plain torch loop with AdamW (the correction's optimizer, at the correction's lr),
no DeepSpeed. The driver judges the generations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.batches import rows_to_columns, to_tensors
from cluster.eval_job import EvalSpec, captured_warnings, generate
from cluster.model_io import load_model, load_tokenizer
from cluster.runtime import ClusterConfig, device_for, pin_threads
from operators.errors import UserError
from operators.ibo_loss import nll_loss
from operators.sequences import sequence_log_probs


@dataclass(frozen=True)
class RelearnSpec:
    """k values (``eval.relearn_steps``), set size, and the correction's lr and batch size."""

    steps: tuple[int, ...] = (10, 50)
    samples: int = 16
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if any(int(k) < 1 for k in self.steps):
            raise UserError(f"eval.relearn_steps={list(self.steps)}: every k must be >= 1")
        if self.samples < 1:
            raise UserError(f"eval.relearn_samples={self.samples}: must be >= 1")
        if self.lr <= 0 or self.batch_size < 1:
            raise UserError(f"ibo.lr={self.lr}, ibo.batch_size={self.batch_size}: relearning "
                             "needs lr > 0 and batch_size >= 1")


def _take(rows: list[dict], step: int, size: int) -> list[dict]:
    start = (step * size) % len(rows)
    return [rows[(start + i) % len(rows)] for i in range(min(size, len(rows)))]


def relearn(model, tokenizer, rows: list[dict], prompts: list[dict], spec: RelearnSpec,
            eval_spec: EvalSpec) -> dict[int, list[str]]:
    """Fine-tune ``model`` in place on ``rows`` (NLL per response token); the greedy
    generations on ``prompts`` after each k of ``spec.steps``."""
    torch.manual_seed(spec.seed)
    device = next(model.parameters()).device
    rows = rows[:spec.samples]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr,
                                  weight_decay=0.0)
    model.eval()  # no dropout, as in the correction
    done, out = 0, {}
    for k in sorted(set(int(k) for k in spec.steps)):
        for step in range(done, k):
            batch = to_tensors(rows_to_columns(_take(rows, step, spec.batch_size)), tokenizer,
                               eval_spec.tokenize, device)
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits
            logp = sequence_log_probs(logits.float(), batch["input_ids"], batch["loss_mask"])
            loss = nll_loss(logp, batch["loss_mask"].sum(1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        done = k
        out[k] = generate(model, tokenizer, prompts, eval_spec)
    return out


def relearn_model(model_path: str, eval_spec: EvalSpec, spec: RelearnSpec, rows: list[dict],
                  prompts: list[dict], cluster: ClusterConfig) -> dict:
    """``relearn`` of the model at ``model_path`` on a worker (a Ray task's body)."""
    pin_threads(cluster.threads_per_worker)
    device = device_for(cluster)
    with captured_warnings() as warnings:
        model = load_model(model_path, eval_spec.dtype, eager_attention=False,
                           trust_remote_code=eval_spec.trust_remote_code, device=device)
        tokenizer = load_tokenizer(eval_spec.tokenizer_path, eval_spec.trust_remote_code)
        generations = relearn(model, tokenizer, rows, prompts, spec, eval_spec)
    return {"generations": generations, "device": device, "dtype": eval_spec.dtype,
            "warnings": warnings}
