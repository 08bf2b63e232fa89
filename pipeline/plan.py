"""The memory plan: peak memory per stage and per GPU, from a model's shapes and the settings.

``python -m pipeline.plan --model llama2-7b --queries 64 --query-rank 32`` (or ``--model
/path/to/model_dir`` for a config.json). Each influence pass is the project's own code run on
fake tensors (``FakeTensorMode``: shapes and dtypes, no memory, no GPU) under ``LiveBytes``,
which counts live storage at the dispatcher the same way on real tensors; so the figures follow
the code, and ``tests/test_plan.py`` checks them against real runs of small models. IBO adds
DeepSpeed ZeRO's sharded states analytically to the measured activations. Figures are tensor
bytes; a GPU adds its CUDA context and allocator slack (``--overhead``, default 10% + 1 GiB).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

GiB = 2 ** 30
SHAPES = {  # Llama-shaped models (the architectures LANCET's users run)
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class PlanConfig:
    """The settings that size memory (the config keys they mirror in brackets)."""

    batch_size: int = 8  # sequences per batch per worker [cluster.batch_size]
    tokens: int = 512  # tokens per sequence [model.max_length]
    dtype: str = "bfloat16"  # [model.dtype]
    method: str = "linfac"  # [influence.method]
    queries: int = 64  # influence queries
    query_parts: int = 3  # parts per query, each a query of its own [influence.query_parts]
    expand_top_k: int = 30  # the second pass's queries, one part each [influence.expand_top_k]
    query_batch_size: int = 1  # [influence.query_batch_size]
    query_rank: int | None = 32  # [influence.query_rank]
    workers: int = 8  # GPUs [cluster.num_workers]
    ibo_batch: int = 8  # rows of each IBO dataset per step per worker [ibo.batch_size]
    zero_stage: int = 3  # [ibo.deepspeed_config]
    new_tokens: int = 64  # generated tokens at evaluation [judge.max_new_tokens]


def model_config(name_or_path: str):
    """A transformers config: a preset name above, or a model directory's config.json."""
    from transformers import AutoConfig, LlamaConfig
    if name_or_path in SHAPES:
        return LlamaConfig(max_position_embeddings=4096, **SHAPES[name_or_path])
    return AutoConfig.from_pretrained(name_or_path)


def _batch(rows: int, tokens: int, vocab: int, prompt: int | None = None) -> dict:
    prompt = tokens // 2 if prompt is None else prompt
    mask = torch.ones(rows, tokens, dtype=torch.long)
    loss = mask.clone()
    loss[:, :prompt] = 0
    return {"input_ids": torch.randint(3, vocab, (rows, tokens)), "attention_mask": mask,
            "loss_mask": loss, "prompt_last": torch.full((rows,), prompt - 1)}


class Session:
    """One model (real or fake) and a way to measure the peak of a step above what is kept."""

    def __init__(self, config, dtype: str, fake: bool) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from transformers import AutoModelForCausalLM

        from cluster.model_io import register_attention
        self.mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
        with self._context():
            torch.manual_seed(0)
            self.model = AutoModelForCausalLM.from_config(
                config, attn_implementation=register_attention(), dtype=DTYPES[dtype]).eval()
        self.vocab = config.vocab_size

    def _context(self):
        from contextlib import nullcontext
        return self.mode if self.mode is not None else nullcontext()

    def batch(self, rows: int, tokens: int) -> dict:
        batch = _batch(rows, tokens, self.vocab)
        return {k: self.mode.from_tensor(v) for k, v in batch.items()} if self.mode else batch

    def peak(self, step: Callable[[], object], kept=()) -> tuple[int, object]:
        """Peak live bytes of ``step`` counting the weights and ``kept`` tensors; its result."""
        from pipeline.memtrack import LiveBytes
        with self._context(), LiveBytes() as live:
            live.track([*self.model.parameters(), *kept])
            result = step()
        return live.peak, result


def influence_peaks(session: Session, plan: PlanConfig) -> dict[str, int]:
    """Bytes per GPU of each influence pass, measured on ``session``'s model."""
    from operators.curvature import covariance_pass, lambda_pass
    from operators.factors import eigendecompose, stat_dtype
    from operators.methods import get_method
    from operators.units import discover_units
    units = discover_units(session.model, plan.method)
    batch = session.batch(plan.batch_size, plan.tokens)
    out = {"plain fwd+bwd": session.peak(lambda: _plain_step(session.model, batch))[0]}
    out["fit: covariance pass"], stats = session.peak(
        lambda: covariance_pass(session.model, units, [batch], "empirical"))
    sums = [v for v in stats.values()]
    largest = max(units, key=lambda u: u.shape[0] ** 2 + u.shape[1] ** 2)
    out["fit: eigendecomposition"] = session.peak(
        lambda: eigendecompose(stats, [largest]), sums)[0]
    with session._context():
        eigens = eigendecompose(stats, units)  # host memory in a worker (float64)
    if get_method(plan.method).eigen_correction:
        out["fit: lambda pass"] = session.peak(
            lambda: lambda_pass(session.model, units, eigens, [batch], "empirical"))[0]
    out.update(_score_peaks(session, plan, units, eigens, stat_dtype(DTYPES[plan.dtype])))
    return out


def _plain_step(model, batch) -> None:
    from operators.sequences import sequence_losses
    model.requires_grad_(True)
    sequence_losses(model, batch).sum().backward()
    model.zero_grad(set_to_none=True)


def _score_peaks(session: Session, plan: PlanConfig, units, eigens, dtype) -> dict[str, int]:
    from operators.curvature import Curvature
    from operators.scores import InfluenceConfig, precondition_queries, score_batch
    config = InfluenceConfig(method=plan.method, query_batch_size=plan.query_batch_size,
                             query_rank=plan.query_rank)
    with session._context():  # Λ's values do not matter here, only its shape
        lambdas = {n: torch.outer(e.s, e.a) for n, e in eigens.items()}
        curvature = Curvature(eigens, lambdas, dict.fromkeys(eigens, 0.1)).to("cpu", dtype)
    kept = [t for e in curvature.eigens.values() for t in (e.qa, e.qs)]
    kept += list(curvature.lambdas.values())
    # every part is preconditioned as a query; the second hop's pass, after the first, as many
    # as its sources
    rows = max(plan.queries * plan.query_parts, plan.expand_top_k)
    loader = max(1, min(plan.batch_size, rows))
    batches = [session.batch(loader, plan.tokens) for _ in range(math.ceil(rows / loader))]
    precondition, queries = session.peak(lambda: precondition_queries(
        session.model, units, batches, config, curvature), kept)
    train = session.batch(plan.batch_size, plan.tokens)
    scoring = session.peak(lambda: score_batch(session.model, units, train, queries, config),
                           list(queries.values()))[0]
    return {f"score: precondition {plan.queries} queries × {plan.query_parts} parts": precondition,
            "score: scoring pass": scoring}


def ibo_peak(session: Session, plan: PlanConfig, params: int) -> int:
    """IBO per GPU: ZeRO-sharded bf16 weights and grads, float32 master weights and Adam
    moments (stage 3 shards all; 2 the grads and optimizer; 1 the optimizer; 0 none), one
    gathered layer under stage 3, and the measured activations of a step over the pairs
    (two sequences each) and the neutral rows."""
    shard = {0: (1, 1, 1), 1: (1, 1, plan.workers), 2: (1, plan.workers, plan.workers),
             3: (plan.workers, plan.workers, plan.workers)}[plan.zero_stage]
    states = 2 * params / shard[0] + 2 * params / shard[1] + 12 * params / shard[2]
    layer = 2 * params / max(1, session.model.config.num_hidden_layers)
    rows = 3 * plan.ibo_batch
    batch = session.batch(rows, plan.tokens)
    frozen = session.peak(lambda: _activation_step(session.model, batch))[0]
    weights = sum(p.numel() * p.element_size() for p in session.model.parameters())
    return int(states + (2 * layer if plan.zero_stage == 3 else 0) + frozen - weights)


def _activation_step(model, batch) -> None:
    from operators.curvature import activation_gradients
    from operators.sequences import sequence_losses
    with activation_gradients(model):
        sequence_losses(model, batch).sum().backward()


def evaluate_peak(config, plan: PlanConfig, weights: int) -> int:
    """Greedy generation with a KV cache: weights, the cache and one step's logits (float32)."""
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = config.hidden_size // heads
    length = plan.tokens + plan.new_tokens
    width = DTYPES[plan.dtype].itemsize
    cache = 2 * layers * plan.batch_size * length * kv_heads * head_dim * width
    logits = plan.batch_size * length * config.vocab_size * 4
    return int(weights + cache + logits)


def plan_memory(name_or_path: str, plan: PlanConfig, fake: bool = True) -> dict[str, int]:
    """Bytes per GPU for every stage of ``plan`` on the model ``name_or_path``."""
    config = model_config(name_or_path)
    session = Session(config, plan.dtype, fake)
    params = sum(p.numel() for p in session.model.parameters())
    weights = sum(p.numel() * p.element_size() for p in session.model.parameters())
    out = {"weights": weights, **influence_peaks(session, plan)}
    out[f"ibo: step (ZeRO-{plan.zero_stage} over {plan.workers} GPUs)"] = ibo_peak(
        session, plan, params)
    out["evaluate: generation"] = evaluate_peak(config, plan, weights)
    return out


def render(name: str, plan: PlanConfig, peaks: dict[str, int], gpu_gib: float,
           overhead: float) -> str:
    """A Markdown table: GiB per stage, with overhead, and whether it fits one GPU."""
    lines = [f"### {name}", "", f"settings: `{json.dumps(asdict(plan))}`", "",
             "| stage | tensors GiB | with overhead GiB | fits one "
             f"{gpu_gib:.0f} GiB GPU |", "| --- | --- | --- | --- |"]
    for stage, size in peaks.items():
        total = size / GiB * (1 + overhead) + 1.0
        lines.append(f"| {stage} | {size / GiB:.1f} | {total:.1f} | "
                     f"{'yes' if total <= gpu_gib else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.plan", description=__doc__)
    parser.add_argument("--model", action="append", default=None,
                        help=f"a preset ({', '.join(SHAPES)}) or a model directory; repeatable")
    for field, value in asdict(PlanConfig()).items():
        kind = int if isinstance(value, int) or value is None else str
        parser.add_argument("--" + field.replace("_", "-"), type=kind, default=value)
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    parser.add_argument("--overhead", type=float, default=0.10)
    parser.add_argument("--write", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    plan = PlanConfig(**{f: getattr(args, f) for f in asdict(PlanConfig())})
    text = ""
    for name in args.model or ["llama2-7b", "llama3-8b"]:
        text += render(name, plan, plan_memory(name, plan), args.gpu_gib, args.overhead) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
