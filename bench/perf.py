"""Performance ratios: memory of the curvature, scoring vs training, batched queries, and the
sweep's reuse of fit_factors (peak RSS of scoring: bench/memory.py; workers: bench/workers.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.recall import batches
from operators.curvature import fit_curvature
from operators.scores import InfluenceConfig, precondition_queries, score_batch
from operators.sequences import sequence_losses
from operators.units import discover_units

ROOT = Path(__file__).resolve().parents[1]


def curvature_floats(d: int, f: int, layers: int, kind: str, gated: bool = False) -> int:
    """Floats held by the eigenbases + Λ of one model (A: (i+1)², S: o², Λ: o(i+1))."""
    def unit(i, o):
        return (i + 1) ** 2 + o ** 2 + o * (i + 1)
    if kind == "linfac":
        return layers * 2 * unit(d, d)
    attn = 4 * unit(d, d)  # q, k, v, o
    mlp = [unit(d, f), unit(d, f), unit(f, d)] if gated else [unit(d, f), unit(f, d)]
    return layers * (attn + sum(mlp))


def memory_ratios(model) -> dict:
    def measured(kind):
        units = discover_units(model, kind)
        return sum((u.shape[1] ** 2 + u.shape[0] ** 2 + u.shape[0] * u.shape[1]) for u in units)
    return {
        "tiny (measured units)": measured("linfac") / measured("ekfac"),
        "GPT-2 small (d=768, f=3072, 12 layers)": curvature_floats(768, 3072, 12, "linfac")
        / curvature_floats(768, 3072, 12, "ekfac"),
        "Llama-2-7B (d=4096, f=11008, 32 layers)": curvature_floats(4096, 11008, 32, "linfac")
        / curvature_floats(4096, 11008, 32, "ekfac", gated=True),
    }


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        began = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - began)
    return best


def scoring_vs_training(model, tok, rows, queries) -> dict:
    data = batches(tok, rows, size=16)
    units = discover_units(model, "linfac")
    curv = fit_curvature(model, units, data[:4], logodds_cap=InfluenceConfig().logodds_cap)
    one = precondition_queries(model, units, batches(tok, queries[:1]), InfluenceConfig(), curv)
    many = precondition_queries(model, units, batches(tok, (queries * 32)[:32]),
                                InfluenceConfig(query_batch_size=32), curv)
    single = precondition_queries(model, units, batches(tok, (queries * 32)[:32]),
                                  InfluenceConfig(query_batch_size=1), curv)

    def epoch():
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        for b in data:
            opt.zero_grad()
            sequence_losses(model, b).sum().backward()

    def scoring(features):
        return lambda: [score_batch(model, units, b, features, InfluenceConfig()) for b in data]

    t_epoch, t_one = timed(epoch), timed(scoring(one))
    return {"scoring pass ÷ training epoch": t_one / t_epoch,
            "32 queries at B=32 ÷ 1 query": timed(scoring(many)) / t_one,
            "32 queries at B=1 ÷ 1 query": timed(scoring(single)) / t_one}


def sweep_reuse(tmp: Path) -> dict:
    env_cmd = [sys.executable, "-m", "pipeline"]
    common = ["debug=tiny", "cluster.local_cpus=2", "pipeline.until=select", "pipeline.summary=false"]
    began = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run(env_cmd + common + [f"cache_dir={tmp / 'single'}", f"output_dir={tmp / 's'}"],
                   cwd=ROOT, check=True, capture_output=True, timeout=1800, env=env)
    single = time.perf_counter() - began
    began = time.perf_counter()
    subprocess.run(env_cmd + ["-m", *common, "influence.alpha=0.5,0.8,0.95",
                              "influence.query_batch_size=1,8", f"cache_dir={tmp / 'sweep'}",
                              f"hydra.sweep.dir={tmp / 'sweep_out'}"],
                   cwd=ROOT, check=True, capture_output=True, timeout=3600, env=env)
    swept = time.perf_counter() - began
    fits = sum(not json.loads((job / "run.json").read_text())["stages"]["fit_factors"]["cached"]
               for job in (tmp / "sweep_out").iterdir() if (job / "run.json").is_file())
    return {"fit_factors runs in a 3×2 sweep": fits, "sweep time ÷ single run": swept / single,
            "single run (s)": single, "sweep (s)": swept}
