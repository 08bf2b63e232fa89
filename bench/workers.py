"""Throughput of factor fitting and scoring with 1 and 2 Ray workers (same inputs, one run).

A model wide enough that per-sequence compute dominates, as it does for any real LLM (random
init: throughput does not depend on the weights), at two corpus sizes. Reported: the end-to-end
rate at the larger size, and the marginal rate between the two sizes (extra sequences over
extra seconds), which cancels the fixed costs that more workers cannot shrink: Ray Train group
start, Ray Data pipeline start on every pass, actor start and model load.

``python -m bench.workers [--quick]`` runs this section alone and prints its table.
"""

from __future__ import annotations

from pathlib import Path

from bench.standalone import run_section
from cluster.batches import TokenizeConfig
from cluster.dataio import write_parquet_atomic
from cluster.datasets import read_prepared
from cluster.factor_job import FactorSpec, fit_factors
from cluster.runtime import ClusterConfig
from cluster.scoring import ScoreSpec, precondition, score_corpus
from pipeline.demo.model import TinyModelConfig, build_model, train_tokenizer

TOKENS = TokenizeConfig(max_length=64)
WIDE = TinyModelConfig(width=256, layers=4, heads=4)


def wide_model(corpus, root: Path) -> Path:
    texts = [f"{r['prompt']} {r['response']}" for r in corpus.train]
    tokenizer = train_tokenizer(texts + [e["prompt"] for e in corpus.eval_prompts])
    out = root / "wide_model"
    build_model(tokenizer, WIDE).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _corpus(corpus, copies: int, path: Path) -> Path:
    write_parquet_atomic([{**r, "id": f"{r['id']}-{k}"} for k in range(copies)
                          for r in corpus.train], path)
    return path


def _fit(model_dir: Path, data: Path, workers: int, work: Path) -> tuple[float, float]:
    """(sequences, seconds) of one factor fit with ``workers`` workers."""
    cluster = ClusterConfig(num_workers=workers, cpus_per_worker=0.5, batch_size=32)
    fit = fit_factors(read_prepared(data, cluster), FactorSpec(str(model_dir), tokenize=TOKENS),
                      cluster, work / f"f_{data.stem}_w{workers}", work / "ray")
    return fit["sequences"], fit["seconds"]


def _score(model_dir: Path, data: Path, factors: Path, queries, workers: int, work: Path):
    """(sequences, seconds) of one scoring pass with ``workers`` workers."""
    cluster = ClusterConfig(num_workers=workers, cpus_per_worker=0.5, batch_size=32)
    spec = ScoreSpec(str(model_dir), tokenize=TOKENS)
    feats = precondition(spec, queries, factors)
    score = score_corpus(read_prepared(data, cluster), spec, feats, cluster,
                         work / f"s_{data.stem}_w{workers}")
    return score["sequences"], score["seconds"]


def _ratios(label: str, runs: dict) -> dict:
    rate, marginal = {}, {}
    for n, ((n0, t0), (n1, t1)) in runs.items():
        rate[n], marginal[n] = n1 / t1, (n1 - n0) / max(t1 - t0, 1e-9)
    return {f"{label} seq/s, 1 worker": rate[1], f"{label} seq/s, 2 workers": rate[2],
            f"{label} 2 ÷ 1 workers, end to end": rate[2] / rate[1],
            f"{label} marginal seq/s, 1 worker": marginal[1],
            f"{label} marginal seq/s, 2 workers": marginal[2],
            f"{label} 2 ÷ 1 workers, marginal (goal ≥ 1.7)": marginal[2] / marginal[1]}


def worker_scaling(corpus, work: Path, quick: bool = False) -> dict:
    model_dir = wide_model(corpus, work)
    queries = [r for r in corpus.train if r["planted"]][:8]
    # scoring costs about a quarter of fitting per sequence: a larger corpus for the same signal
    fit_sizes, score_sizes = ((1, 3), (2, 8)) if quick else ((2, 6), (4, 24))
    fit_data = [_corpus(corpus, k, work / f"fit_{k}x.parquet") for k in fit_sizes]
    score_data = [_corpus(corpus, k, work / f"score_{k}x.parquet") for k in score_sizes]
    fits = {n: [_fit(model_dir, d, n, work) for d in fit_data] for n in (1, 2)}
    factors = work / f"f_{fit_data[0].stem}_w1"
    scores = {n: [_score(model_dir, d, factors, queries, n, work) for d in score_data]
              for n in (1, 2)}
    rows = len(corpus.train)
    return {**_ratios("factor fitting", fits), **_ratios("scoring", scores),
            "worker scaling corpora (rows)": (
                f"fit {fit_sizes[0] * rows} and {fit_sizes[1] * rows}, score "
                f"{score_sizes[0] * rows} and {score_sizes[1] * rows}; GPT-2 width "
                f"{WIDE.width}, {WIDE.layers} layers; 0.5 CPU and 1 thread per worker")}


def _measure(work: Path, quick: bool) -> dict:
    from pipeline.demo.corpus import build_corpus
    return worker_scaling(build_corpus(seed=0), work, quick)


if __name__ == "__main__":
    run_section("workers", _measure)
