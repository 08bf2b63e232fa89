"""``evaluate``: before/after behaviour, utility and detection (CONTRACT.md section 5).

Generation and perplexity of both models run as Ray tasks (``cluster.eval_job``) with a
worker's resources; the driver judges the texts and writes the metrics. A correction that
refuses everything would score a perfect undesirable rate, so the models also generate on clean
prompts (over-refusal, distinct-2 there), and the corrected model is fine-tuned back on the
positive-influence samples for k steps (relearning, ``cluster.relearn_job``).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import torch

from cluster.eval_job import evaluate_models
from cluster.runtime import connect
from operators.metrics import auprc, distinct_n, recall_at_k
from pipeline import specs
from pipeline.artifacts import Selection
from pipeline.dag import StageContext
from pipeline.evaluation import judged
from pipeline.judge import Judge, judge_config


def detection(selection: Selection, label: str) -> dict:
    """AUPRC and recall@k of the ranking against the ground-truth column ``label``."""
    table = selection.columns("score", label) if label else {}
    if label not in table:
        return {}
    scores = [s if s == s else -math.inf for s in table["score"]]
    labels = [bool(x) for x in table[label]]
    return {"detect/auprc": auprc(scores, labels), "detect/recall_at_k": recall_at_k(scores, labels),
            "detect/positives": sum(labels)}


# Rows of a set the judge reads for ``judged_sets`` (a classifier judge runs in the driver).
JUDGED_ROWS = 2000


def _sample_responses(path: Path, id_col: str, text_col: str, seed: int, limit: int) -> list[str]:
    """Up to ``limit`` responses of distinct ids of ``path``, streamed in batches: the ids whose
    seeded hash is smallest (a bottom-k sample: uniform over the ids, the same for a seed, and
    never more than ``limit`` rows in memory however large the set)."""
    if not path.is_file():
        return []
    heap: list[tuple[int, str, str]] = []  # (-hash, id, text): the largest kept hash on top
    held: set[str] = set()
    for batch in pq.ParquetFile(path).iter_batches(columns=[id_col, text_col], batch_size=4096):
        for row_id, text in zip(*(batch.column(c).to_pylist() for c in (id_col, text_col))):
            if row_id in held:
                continue
            key = int.from_bytes(hashlib.blake2b(f"{seed}:{row_id}".encode(),
                                                 digest_size=8).digest(), "big")
            if len(heap) < limit:
                heapq.heappush(heap, (-key, row_id, str(text)))
            elif key < -heap[0][0]:
                held.discard(heapq.heapreplace(heap, (-key, row_id, str(text)))[1])
            else:
                continue
            held.add(row_id)
    return [text for _, _, text in sorted(heap, reverse=True)]


def judged_sets(selection: Selection, judge: Judge, seed: int, limit: int = JUDGED_ROWS) -> dict:
    """A label-free look at the influence sets: the share of D_IF+ (and of D_IF−, its samples
    as the pairs hold them) whose own response the judge flags, over up to ``limit`` samples of
    each (``_sample_responses``). A diagnostic, not a label: a sample can drive a behaviour
    without showing it, and a keyword judge sees only its patterns; but a positive set the
    judge rarely flags where the behaviour is a phrase is a sign of benign samples among the
    drivers (docs/METHOD.md section 6)."""
    out = {}
    for name, path, cols in (("positive", selection.set_file("positive"), ("id", "response")),
                             ("negative", selection.set_file("pairs"),
                              ("neg_id", "neg_response"))):
        responses = _sample_responses(path, *cols, seed, limit)
        if responses:
            flags = judge.flags(responses)
            out[f"detect/{name}_judged_share"] = sum(flags) / len(flags)
            out[f"detect/{name}_judged_rows"] = len(flags)
    return out


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


def _clean_metrics(result: dict, clean: list[dict], judge: Judge, suffix: str) -> tuple:
    """Over-refusal and distinct-2 of one model's generations on clean prompts."""
    texts = result.get("clean_generations") or []
    if not texts:
        return {}, []
    refused = judge.refusals(texts)
    out = {f"behavior/overrefusal_rate_{suffix}": sum(refused) / len(refused),
           f"utility/distinct2_clean_{suffix}": distinct_n(texts, 2)}
    return out, [{"id": c.get("id"), "prompt": c["prompt"], "generation": t, "refused": r}
                 for c, t, r in zip(clean, texts, refused)]


def _relearn_metrics(result: dict | None, prompts: list[dict], judge: Judge) -> dict:
    """``robustness/relearn_<k>_undesirable_rate`` (seen prompts, as the before/after rates)
    and its ``_unseen`` twin, per k."""
    out = {}
    for k, texts in sorted((result or {}).get("generations", {}).items()):
        b = judged(prompts, texts, judge)
        out[f"robustness/relearn_{k}_undesirable_rate"] = b["rate_seen"]
        out[f"robustness/relearn_{k}_undesirable_rate_unseen"] = b["rate_unseen"]
    return out


def _relearn_job(ctx: StageContext, after: str, prompts: list[dict]):
    """(model, spec, rows) of the relearning task, or None (off, or nothing to relearn from)."""
    spec = specs.relearn_spec(ctx.cfg)
    positive = ctx.input("select").set_file("positive")
    if spec is None or not prompts:
        return None
    if not positive.is_file():
        ctx.log("evaluate: no positive-influence samples, relearning skipped")
        return None
    return after, spec, _rows(positive)[:spec.samples]  # scores/ is in rank order


def _evaluate_on_workers(ctx: StageContext, base: str, prompts, clean) -> dict[str, dict]:
    """Generations and perplexity of θs and the corrected model (and the corrected model's
    relearning), as Ray tasks."""
    cfg = ctx.cfg
    cluster = specs.cluster(cfg)
    connect(cluster)
    paths = {"before": base, "after": str(ctx.input("ibo").model)}
    results = evaluate_models(paths, specs.eval_spec(cfg, base), prompts, clean, cluster,
                              _relearn_job(ctx, paths["after"], prompts))
    for name, result in results.items():
        ctx.log(f"evaluate ({name}) ran on {result['device']} in {result['dtype']}")
        for warning in dict.fromkeys(result["warnings"]):
            ctx.log(f"evaluate ({name}): {warning}")
    return results


def run(ctx: StageContext) -> dict:
    cfg, prepared, out = ctx.cfg, ctx.input("prepare"), ctx.output()
    torch.manual_seed(cfg.seed)
    judge = Judge(judge_config(cfg.judge))
    prompts = _rows(prepared.eval_prompts)
    clean = _rows(prepared.clean_eval)
    if not prompts and not clean:
        ctx.log("warning: evaluate: no prompts to generate on (data.eval and data.clean_eval "
                "are empty): no undesirable, refusal or perplexity figures; give data.eval "
                "(and a judge) to measure the correction")
    metrics = detection(ctx.input("select"), prepared.label_column())
    metrics.update(judged_sets(ctx.input("select"), judge, cfg.seed))
    results = _evaluate_on_workers(ctx, prepared.model_dir(), prompts, clean)
    before, gens_before = _model_metrics(results["before"], prompts, judge, "before")
    after, gens_after = _model_metrics(results["after"], prompts, judge, "after")
    clean_before, refusals_before = _clean_metrics(results["before"], clean, judge, "before")
    clean_after, refusals_after = _clean_metrics(results["after"], clean, judge, "after")
    for part in (before, after, clean_before, clean_after,
                 _relearn_metrics(results.get("relearn"), prompts, judge)):
        metrics.update(part)
    out.metrics_file.write_text(json.dumps(metrics, indent=2))
    with open(out.file("generations.jsonl"), "w") as handle:
        for b, a in zip(gens_before, gens_after):
            handle.write(json.dumps({**b, "generation_after": a["generation"],
                                     "flagged_after": a["flagged"]}) + "\n")
    with open(out.file("clean_generations.jsonl"), "w") as handle:
        for b, a in zip(refusals_before, refusals_after):
            handle.write(json.dumps({**b, "generation_after": a["generation"],
                                     "refused_after": a["refused"]}) + "\n")
    return metrics


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist() if path.is_file() else []
