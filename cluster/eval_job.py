"""The evaluate stage's model work as Ray tasks: greedy generations (on the harmful evaluation
prompts and on clean prompts, for over-refusal) and clean perplexity of a model, and the
relearning measurement (``cluster.relearn_job``), each on a worker with the cluster's resources
(a GPU with ``cluster=gpu``), in ``model.dtype``.

The driver only judges the returned texts: it never loads the models. Warnings a task logs
(prompts cut to the model's context, for instance) come back with its result, since workers'
logs stay in Ray's session folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from cluster.batches import TURNS, TokenizeConfig, to_tensors, turns_of
from cluster.model_io import load_model, load_tokenizer
from cluster.runtime import ClusterConfig, device_for, pin_threads
from operators.errors import UserError
from operators.generation import context_limit, greedy_generate
from operators.metrics import perplexity
from operators.sequences import sequence_losses


@dataclass(frozen=True)
class EvalSpec:
    """What one evaluation task needs besides the rows."""

    tokenizer_path: str
    dtype: str = "float32"
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    max_new_tokens: int = 24
    batch_size: int = 16
    trust_remote_code: bool = False
    # Clean prompts (the first of data.clean_eval) generated on, for over-refusal; 0: none.
    clean_prompts: int = 64

    def __post_init__(self) -> None:
        if self.clean_prompts < 0:
            raise UserError(f"eval.clean_prompts={self.clean_prompts}: must be >= 0")


@torch.no_grad()
def clean_perplexity(model, tokenizer, rows: list[dict], config: TokenizeConfig,
                     batch: int = 16) -> float:
    """Perplexity of the responses of ``rows``, tokenized as fitting and scoring tokenize them
    (the loss on the response only; samples longer than the model's positions are cut)."""
    limit = context_limit(model, config.max_length)
    config = replace(config, truncate=True, train_on_prompt=False, max_length=limit)
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    model.eval()
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        columns = {"id": np.array([str(r.get("id", start + i)) for i, r in enumerate(chunk)]),
                   "prompt": np.array([r["prompt"] for r in chunk], dtype=object),
                   "response": np.array([r["response"] for r in chunk], dtype=object),
                   TURNS: np.array([r.get(TURNS) for r in chunk], dtype=object)}
        b = to_tensors(columns, tokenizer, config, device)
        nll += float(sequence_losses(model, b).float().sum())
        tokens += int(b["loss_mask"].sum())
    return perplexity(nll, tokens)


def generate(model, tokenizer, prompts: list[dict], spec: EvalSpec) -> list[str]:
    """Greedy generations for prompt rows (their ``prompt_turns`` rendered by the template)."""
    return greedy_generate(model, tokenizer, [p["prompt"] for p in prompts], spec.max_new_tokens,
                           spec.tokenize.max_length,
                           turns=[turns_of(p.get(TURNS)) for p in prompts],
                           template=spec.tokenize.template, batch_size=spec.batch_size)


def evaluate_model(model_path: str, spec: EvalSpec, prompts: list[dict], clean: list[dict],
                   cluster: ClusterConfig) -> dict:
    """One model's generations on ``prompts`` and on the first ``spec.clean_prompts`` clean
    prompts (``[]`` without rows) and its perplexity (None without rows)."""
    pin_threads(cluster.threads_per_worker)
    device = device_for(cluster)
    with captured_warnings() as warnings:
        model = load_model(model_path, spec.dtype, eager_attention=False,
                           trust_remote_code=spec.trust_remote_code, device=device)
        tokenizer = load_tokenizer(spec.tokenizer_path, spec.trust_remote_code)
        texts = generate(model, tokenizer, prompts, spec) if prompts else []
        clean_prompts = clean[:spec.clean_prompts]
        clean_texts = generate(model, tokenizer, clean_prompts, spec) if clean_prompts else []
        ppl = (clean_perplexity(model, tokenizer, clean, spec.tokenize, spec.batch_size)
               if clean else None)
    return {"generations": texts, "clean_generations": clean_texts, "ppl": ppl,
            "device": device, "dtype": spec.dtype, "warnings": warnings}


def evaluate_models(paths: dict[str, str], spec: EvalSpec, prompts: list[dict],
                    clean: list[dict], cluster: ClusterConfig, relearn=None) -> dict[str, dict]:
    """``evaluate_model`` of every named model, each a Ray task (run side by side where the
    cluster has room); the caller has connected to Ray.

    ``relearn``: ``(model_path, RelearnSpec, positive rows)`` adds a ``"relearn"`` result,
    ``relearn_job.relearn_model`` on ``prompts`` as one more task beside them.
    """
    import ray
    gpus = cluster.gpus_per_worker if cluster.use_gpu else 0
    task = ray.remote(evaluate_model).options(num_cpus=cluster.cpus_per_worker, num_gpus=gpus)
    rows = ray.put(prompts), ray.put(clean)  # shared by the tasks
    refs = {name: task.remote(path, spec, *rows, cluster) for name, path in paths.items()}
    if relearn is not None:
        from cluster.relearn_job import relearn_model
        path, relearn_spec, positive = relearn
        again = ray.remote(relearn_model).options(num_cpus=cluster.cpus_per_worker,
                                                  num_gpus=gpus)
        refs["relearn"] = again.remote(path, spec, relearn_spec, positive, rows[0], cluster)
    return wait_for_evaluations(refs)


def wait_for_evaluations(refs: dict) -> dict[str, dict]:
    import ray
    return dict(zip(refs, ray.get(list(refs.values()))))


@contextmanager
def captured_warnings() -> Iterator[list[str]]:
    """Collect the warnings the operators log while the block runs."""
    found: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: found.append(record.getMessage())
    logger = logging.getLogger("operators")
    logger.addHandler(handler)
    try:
        yield found
    finally:
        logger.removeHandler(handler)
