"""The DAG as a table: name, function, inputs, the config it depends on, where it is published."""

from __future__ import annotations

from pipeline import specs
from pipeline.config import LancetConf
from pipeline.dag import Stage
from pipeline.stages import correct, evaluate, influence, prepare, report, select

MODEL_KEYS = ("model", "demo", "data", "judge", "seed")
INFLUENCE_KEYS = ("influence.method", "influence.fisher", "influence.logodds_cap",
                  "influence.damping", "influence.damping_absolute", "influence.module_filter")


def prepare_reads(cfg: LancetConf) -> dict[str, str]:
    d = cfg.data
    return {"data.train": d.train, "data.queries": d.queries, "data.eval": d.eval,
            "data.clean_eval": d.clean_eval, "model.path": cfg.model.path}


def ibo_reads(cfg: LancetConf) -> dict[str, str]:
    return {"ibo.deepspeed_config": str(specs.deepspeed_path(cfg))}


def judge_reads(cfg: LancetConf) -> dict[str, str]:
    return {"judge.path": cfg.judge.path}  # a classifier judge's folder (empty: keyword judge)


# The stages that run Ray workers: the cluster must be able to place them before any starts.
CLUSTER_STAGES = ("fit_factors", "score", "ibo")

STAGES = [
    Stage("prepare", prepare.run, (), MODEL_KEYS, "data", reads=prepare_reads),
    Stage("fit_factors", influence.run_fit, ("prepare",), INFLUENCE_KEYS, "factors"),
    Stage("score", influence.run_score, ("prepare", "fit_factors"),
          INFLUENCE_KEYS + ("influence.query_batch_size", "influence.aggregate",
                            "influence.similarity", "influence.query_rank",
                            "influence.query_grouping", "influence.attribution_top_k",
                            "influence.attribution_contrast",
                            "influence.query_parts", "influence.opening_tokens",
                            "influence.opening_outside_judged", "influence.expand_top_k",
                            "judge.kind", "judge.patterns", "judge.demo"),
          "influence",
          # 5: queries in parts (issue #17); 6: no opening outside the judged text; 7: the
          # second hop; 8: the top rows' dependence on each sublayer (unit_dependence)
          version="8"),
    Stage("select", select.run, ("prepare", "score"),
          ("influence.alpha", "influence.max_fraction", "influence.pair_power", "seed"),
          "scores"),
    # ibo.batch_size is rows per worker: the real batch is batch_size × num_workers
    Stage("ibo", correct.run, ("prepare", "select"), ("ibo", "seed", "cluster.num_workers"), "ibo",
          reads=ibo_reads, curves=("curve.jsonl",), model="model"),
    Stage("evaluate", evaluate.run, ("prepare", "select", "ibo"), ("judge", "eval"), "eval",
          artifacts=("metrics.json",), reads=judge_reads,
          version="4"),  # 3: over-refusal and relearning (issue #15); 4: judged_sets
    Stage("report", report.run, ("prepare", "select", "evaluate"), ("judge",), "report",
          artifacts=(".",), reads=judge_reads,
          # 3: per-sublayer attribution (issue #17); 4: the judged column; 5: the dependence
          version="5"),
]
