"""``evaluate``: before/after behaviour, utility and detection (CONTRACT.md section 5)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import torch

from cluster.model_io import load_model, load_tokenizer
from cluster.selection_io import SCORES_FILE
from operators.metrics import auprc, recall_at_k
from pipeline.dag import StageContext
from pipeline.evaluation import behaviour, clean_perplexity
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


def _model_metrics(path: str, tokenizer, prompts, clean, judge, cfg, suffix: str) -> tuple:
    model = load_model(path, "float32")
    out = {}
    gens = []
    if prompts:
        b = behaviour(model, tokenizer, prompts, judge, cfg.judge.max_new_tokens,
                      cfg.model.max_length)
        out[f"behavior/undesirable_rate_{suffix}"] = b["rate_seen"]
        out[f"behavior/undesirable_rate_unseen_{suffix}"] = b["rate_unseen"]
        out[f"utility/distinct2_{suffix}"] = b["distinct2"]
        gens = b["generations"]
    if clean:
        out[f"utility/ppl_{suffix}"] = clean_perplexity(model, tokenizer, clean,
                                                        cfg.model.max_length)
    return out, gens


def run(ctx: StageContext) -> dict:
    cfg, prepared = ctx.cfg, ctx.inputs["prepare"]
    torch.manual_seed(cfg.seed)
    info = json.loads((prepared / "info.json").read_text())
    base = model_dir(prepared)
    tokenizer = load_tokenizer(base, cfg.model.trust_remote_code)
    judge = Judge(judge_config(cfg.judge))
    prompts = _rows(prepared / "eval.parquet")
    clean = _rows(prepared / "clean_eval.parquet")
    metrics = detection(ctx.inputs["select"] / SCORES_FILE, info.get("label_column", ""))
    before, gens_before = _model_metrics(base, tokenizer, prompts, clean, judge, cfg, "before")
    after_dir = ctx.inputs["ibo"] / "model"
    after, gens_after = _model_metrics(str(after_dir), tokenizer, prompts, clean, judge, cfg,
                                       "after")
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
