"""`make bench-gpu` (``python -m bench.gpu``): the influence passes against a plain training step.

On one GPU, a Llama-shaped ~1B model (TinyLlama's shapes, random init) in bf16 over 512-token
sequences: tokens/s and peak memory of a plain forward+backward (SDPA), the LinFAC and EK-FAC
covariance and eigenvalue-correction passes, preconditioning 64 queries (rank 32) and scoring.
Writes the "GPU" section of bench/RESULTS.md, naming the device. Without CUDA it says so and
skips; ``--device cpu --shape small`` runs the same measurements on a small model on the CPU
(printed only: CPU timings say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch
from transformers import LlamaConfig

from bench import results_file
from pipeline.plan import SHAPES, Session, _batch

RESULTS = results_file.RESULTS
BEGIN, END = "<!-- gpu section: python -m bench.gpu -->", "<!-- end of gpu section -->"
SMALL = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step, device: str, repeats: int) -> tuple[float, float]:
    """(seconds per call, peak GiB) of ``step`` after one warm-up call."""
    step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for _ in range(repeats):
        step()
    _sync(device)
    seconds = (time.perf_counter() - began) / repeats
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    return seconds, peak


def measure(shape: dict, device: str, dtype: str, batch: int, tokens: int, queries: int,
            rank: int, repeats: int) -> list[dict]:
    """One row per pass: seconds, tokens/s, peak GiB, time ÷ plain fwd+bwd."""
    from operators.curvature import Curvature, covariance_pass, lambda_pass
    from operators.factors import eigendecompose
    from operators.scores import InfluenceConfig, precondition_queries, score_batch
    from operators.sequences import sequence_losses
    from operators.units import discover_units
    config = LlamaConfig(max_position_embeddings=4096, **shape)
    model = Session(config, dtype, fake=False).model.to(device)
    data = {k: v.to(device) for k, v in _batch(batch, tokens, config.vocab_size).items()}

    def plain():
        model.requires_grad_(True)
        sequence_losses(model, data).sum().backward()
        model.zero_grad(set_to_none=True)

    rows = [("plain fwd+bwd", plain, batch * tokens)]
    for method in ("linfac", "ekfac"):
        units = discover_units(model, method)
        stats = covariance_pass(model, units, [data], "sampled")
        eigens = eigendecompose(stats, units)
        rows.append((f"{method} covariance pass",
                     lambda u=units: covariance_pass(model, u, [data], "sampled"), batch * tokens))
        rows.append((f"{method} lambda pass",
                     lambda u=units, e=eigens: lambda_pass(model, u, e, [data], "sampled"),
                     batch * tokens))
    rows.append(("linfac covariance pass, eager attention", _eager_pass(model, data),
                 batch * tokens))
    units = discover_units(model, "linfac")
    eigens = eigendecompose(covariance_pass(model, units, [data], "sampled"), units)
    lam = {n: torch.outer(e.s, e.a) for n, e in eigens.items()}
    curvature = Curvature(eigens, lam, dict.fromkeys(eigens, 0.1)).to(device, torch.float32)
    influence = InfluenceConfig(query_rank=rank)
    query_data = [data] * max(1, queries // batch)
    features = precondition_queries(model, units, query_data, influence, curvature)
    rows.append((f"precondition {queries} queries (rank {rank})",
                 lambda: precondition_queries(model, units, query_data, influence, curvature),
                 len(query_data) * batch * tokens))
    rows.append(("linfac scoring pass", lambda: score_batch(model, units, data, features,
                                                              influence), batch * tokens))
    out = []
    for name, step, count in rows:
        seconds, peak = timed(step, device, repeats)
        out.append({"pass": name, "s": seconds, "tokens/s": count / seconds, "peak GiB": peak})
    base = out[0]["s"] / (batch * tokens)
    for row in out:
        row["÷ fwd+bwd (per token)"] = row["tokens/s"] and (1 / row["tokens/s"]) / base
    return out


def _eager_pass(model, data):
    """The LinFAC covariance pass with eager attention (what ``lancet_sdpa`` replaces)."""
    from operators.curvature import covariance_pass
    from operators.units import discover_units

    def step():
        model.set_attn_implementation("eager")
        try:
            covariance_pass(model, discover_units(model, "linfac"), [data], "sampled")
        finally:
            model.set_attn_implementation("lancet_sdpa")
    return step


def render(rows: list[dict], header: str) -> str:
    """``header``, a blank line, then ``rows`` as a Markdown table."""
    keys = list(rows[0])
    lines = [header, "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v)
                                        for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


def write_section(text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace (or append) the section between ``begin`` and ``end`` of RESULTS.md (the GPU
    section by default), under the file's edit lock (bench/results_file.py); `make bench`
    keeps it."""
    results_file.write_section(text, begin, end, RESULTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="tinyllama-1.1b", help=f"{list(SHAPES)} or small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device on this machine; skipped (run it on a GPU machine, "
              "or `python -m bench.gpu --device cpu --shape small` for the CPU figures)")
        return 0
    shape = SMALL if args.shape == "small" else SHAPES[args.shape]
    rows = measure(shape, args.device, args.dtype, args.batch, args.tokens, args.queries,
                   args.rank, args.repeats)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    header = (f"## GPU: influence passes vs a plain training step\n\n"
              f"`python -m bench.gpu {' '.join(argv or [])}` on {device}, "
              f"{datetime.date.today()}: `{args.shape}` shapes, {args.dtype}, batch "
              f"{args.batch} × {args.tokens} tokens, torch {torch.__version__}.")
    text = render(rows, header)
    print(text)
    if args.device == "cuda":
        write_section(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
