"""The DAG as a table: name, function, inputs, the config it depends on, where it is published."""

from __future__ import annotations

from pipeline.dag import Stage
from pipeline.stages import correct, evaluate, influence, prepare, report, select

MODEL_KEYS = ("model", "demo", "data", "judge", "seed")
INFLUENCE_KEYS = ("influence.method", "influence.fisher", "influence.damping",
                  "influence.damping_absolute", "influence.module_filter")

STAGES = [
    Stage("prepare", prepare.run, (), MODEL_KEYS, "data"),
    Stage("fit_factors", influence.run_fit, ("prepare",), INFLUENCE_KEYS, "factors"),
    Stage("score", influence.run_score, ("prepare", "fit_factors"),
          INFLUENCE_KEYS + ("influence.query_batch_size", "influence.aggregate",
                            "influence.similarity", "influence.query_rank"), "influence",
          version="3"),  # 3: scored by fixed row-range shards (resumable)
    Stage("select", select.run, ("prepare", "score"),
          ("influence.alpha", "influence.max_fraction", "seed"), "scores"),
    Stage("ibo", correct.run, ("prepare", "select"), ("ibo", "seed"), "ibo",
          curves=("curve.jsonl",), model="model"),
    Stage("evaluate", evaluate.run, ("prepare", "select", "ibo"), ("judge",), "eval",
          artifacts=("metrics.json",),
          version="2"),  # 2: batched generation with a KV cache, on a Ray worker
    Stage("report", report.run, ("prepare", "select", "evaluate"), (), "report",
          artifacts=(".",)),
]
