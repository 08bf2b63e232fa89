"""``evaluate``: before/after behaviour, utility and detection (CONTRACT.md section 5).

Generation and perplexity of both models run as Ray tasks (``cluster.eval_job``) with a
worker's resources; the driver judges the texts and writes the metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import torch

from cluster.eval_job import evaluate_models
from cluster.runtime import connect
from cluster.selection_io import SCORES_FILE
from operators.metrics import auprc, recall_at_k
from pipeline import specs
from pipeline.dag import StageContext
from pipeline.evaluation import judged
from pipeline.judge import Judge, judge_config
from pipeline.stages.prepare import model_dir

METRICS_FILE = "metrics.json"


def detection(scores_path: Path, label: str) -> dict:
    table = pq.read_table(scores_path).to_pydict()
    if not label or label not in table:
        return {}
    scores = [s if s == s else -math.inf for s in table["score"]]
    labels = [bool(x) for x in table[label]]
    return {"detect/auprc": auprc(scores, labels), "detect/recall_at_k": recall_at_k(scores, labels),
            "detect/positives": sum(labels)}


def _model_metrics(result: dict, prompts: list[dict], judge: Judge, suffix: str) -> tuple:
    """One model's metrics from its evaluation task's generations and perplexity."""
    out, gens = {}, []
    if prompts:
        b = judged(prompts, result["generations"], judge)
        out[f"behavior/undesirable_rate_{suffix}"] = b["rate_seen"]
        out[f"behavior/undesirable_rate_unseen_{suffix}"] = b["rate_unseen"]
        out[f"utility/distinct2_{suffix}"] = b["distinct2"]
        gens = b["generations"]
    if result["ppl"] is not None:
        out[f"utility/ppl_{suffix}"] = result["ppl"]
    return out, gens


def _evaluate_on_workers(ctx: StageContext, base: str, prompts, clean) -> dict[str, dict]:
    """Generations and perplexity of θs and the corrected model, as Ray tasks."""
    cfg = ctx.cfg
    cluster = specs.cluster(cfg)
    connect(cluster)
    paths = {"before": base, "after": str(ctx.inputs["ibo"] / "model")}
    results = evaluate_models(paths, specs.eval_spec(cfg, base), prompts, clean, cluster)
    for name, result in results.items():
        ctx.log(f"evaluate ({name}) ran on {result['device']} in {result['dtype']}")
        for warning in dict.fromkeys(result["warnings"]):
            ctx.log(f"evaluate ({name}): {warning}")
    return results


def run(ctx: StageContext) -> dict:
    cfg, prepared = ctx.cfg, ctx.inputs["prepare"]
    torch.manual_seed(cfg.seed)
    info = json.loads((prepared / "info.json").read_text())
    judge = Judge(judge_config(cfg.judge))
    prompts = _rows(prepared / "eval.parquet")
    clean = _rows(prepared / "clean_eval.parquet")
    metrics = detection(ctx.inputs["select"] / SCORES_FILE, info.get("label_column", ""))
    results = _evaluate_on_workers(ctx, model_dir(prepared), prompts, clean)
    before, gens_before = _model_metrics(results["before"], prompts, judge, "before")
    after, gens_after = _model_metrics(results["after"], prompts, judge, "after")
    metrics.update(before)
    metrics.update(after)
    (ctx.out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    with open(ctx.out / "generations.jsonl", "w") as handle:
        for b, a in zip(gens_before, gens_after):
            handle.write(json.dumps({**b, "generation_after": a["generation"],
                                     "flagged_after": a["flagged"]}) + "\n")
    return metrics


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist() if path.is_file() else []
