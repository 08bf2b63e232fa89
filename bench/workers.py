"""Throughput of factor fitting and scoring with 1 and 2 Ray workers (same inputs, one run)."""

from __future__ import annotations

from pathlib import Path

from cluster.batches import TokenizeConfig
from cluster.dataio import write_parquet_atomic
from cluster.datasets import read_prepared
from cluster.factor_job import FactorSpec, fit_factors
from cluster.runtime import ClusterConfig
from cluster.scoring import ScoreSpec, precondition, score_corpus

TOKENS = TokenizeConfig(max_length=64)


def worker_scaling(model_dir: Path, corpus, work: Path) -> dict:
    rows = [{**r, "id": f"{r['id']}-{k}"} for k in range(8) for r in corpus.train]
    data = work / "scale.parquet"
    write_parquet_atomic(rows, data)
    queries = [r for r in corpus.train if r["planted"]][:8]
    out = {}
    for n in (1, 2):
        cluster = ClusterConfig(num_workers=n, cpus_per_worker=0.5, batch_size=32)
        fit = fit_factors(read_prepared(data, cluster), FactorSpec(str(model_dir), tokenize=TOKENS),
                          cluster, work / f"f{n}", work / "ray")
        spec = ScoreSpec(str(model_dir), tokenize=TOKENS)
        feats = precondition(spec, queries, work / f"f{n}")
        score = score_corpus(read_prepared(data, cluster), spec, feats, cluster, work / f"s{n}")
        out[n] = (fit["sequences_per_s"], score["sequences_per_s"])
    return {"factor fitting seq/s, 1 worker": out[1][0], "factor fitting seq/s, 2 workers": out[2][0],
            "factor fitting 2 ÷ 1 workers (goal ≥ 1.7)": out[2][0] / out[1][0],
            "scoring seq/s, 1 worker": out[1][1], "scoring seq/s, 2 workers": out[2][1],
            "scoring 2 ÷ 1 workers (goal ≥ 1.7)": out[2][1] / out[1][1]}
