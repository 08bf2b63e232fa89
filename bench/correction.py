"""Correction quality per method (through the Ray Train + DeepSpeed job) and the step-time ratio."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.batches import TokenizeConfig
from cluster.dataio import write_parquet_atomic
from cluster.datasets import read_prepared
from cluster.ibo_job import IBOSpec, run_ibo
from cluster.ibo_objectives import ObjectiveConfig, get_objective
from cluster.model_io import load_model, load_tokenizer
from cluster.runtime import ClusterConfig
from cluster.selection_io import write_selection
from operators.ibo_loss import IBOLossConfig
from pipeline.evaluation import behaviour, clean_perplexity
from pipeline.judge import Judge, JudgeConfig
from pipeline.specs import PROJECT

CLUSTER = ClusterConfig(num_workers=2, cpus_per_worker=0.5, batch_size=16)
TOKENS = TokenizeConfig(max_length=64)


def save(model, tok, rows, root: Path):
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_parquet_atomic(rows, root / "train.parquet")
    return root / "model"


def select_from_scores(rows, raw, root: Path, alpha=0.8):
    """The select stage's files from raw scores ``[N, Q]`` (max-aggregated, with the
    inhibition the negative set is built on, as the score stage writes them)."""
    from operators.scores import aggregate, inhibition
    from operators.selection import SelectionConfig
    table = [{**r, "score": float(s), "inhibition": float(i), "rank": 0}
             for r, s, i in zip(rows, aggregate(raw, "max"), inhibition(raw, "max"))]
    write_parquet_atomic(table, root / "ranked.parquet")
    return write_selection(root / "ranked.parquet", SelectionConfig(alpha=alpha), root / "scores",
                           root / "select", "planted")


def evaluate(model_dir, base_dir, corpus, patterns) -> dict:
    tok = load_tokenizer(base_dir)
    model = load_model(model_dir)
    judge = Judge(JudgeConfig(patterns=tuple(patterns)))
    b = behaviour(model, tok, corpus.eval_prompts, judge, 24, 64)
    clean = behaviour(model, tok, corpus.clean_eval, judge, 24, 64)  # issue #15: over-refusal
    refused = judge.refusals([g["generation"] for g in clean["generations"]])
    return {"seen": b["rate_seen"], "unseen": b["rate_unseen"], "distinct2": b["distinct2"],
            "overrefusal": sum(refused) / len(refused),
            "ppl": clean_perplexity(model, tok, corpus.clean_eval, 64)}


def correct(model_dir, root: Path, method: str, name: str, loss: IBOLossConfig | None = None,
            **kw) -> dict:
    objective = ObjectiveConfig(method=method, loss=loss or IBOLossConfig(), tokenize=TOKENS)
    spec = IBOSpec(model_path=str(model_dir),
                   deepspeed_config=str(PROJECT / "conf/deepspeed/zero0.json"),
                   objective=objective, **kw)
    datasets = {n: read_prepared(root / "select" / f"{n}.parquet", CLUSTER)
                for n in get_objective(method).datasets}
    metrics = run_ibo(datasets, spec, CLUSTER, root / name, root / "ray")
    (root / name / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def yaml_settings(method: str) -> dict:
    """``correct``'s keyword arguments as ``conf/ibo/<method>.yaml`` sets them."""
    import yaml

    from pipeline.config import IBOConf
    conf = {**vars(IBOConf()),  # what the YAML leaves out: the schema's defaults
            **yaml.safe_load((PROJECT / "conf" / "ibo" / f"{method}.yaml").read_text())}
    loss = IBOLossConfig(beta=float(conf["beta"]), gamma=float(conf["gamma"]),
                         delta=float(conf["delta"]), granularity=str(conf["granularity"]),
                         rejected_tokens=str(conf["rejected_tokens"]))
    return {"loss": loss, "lr": float(conf["lr"]), "steps": int(conf["steps"]),
            "checkpoint_every": int(conf["checkpoint_every"]),
            "reinit": bool(conf.get("reinit", False))}


BASELINE_SETTINGS = {m: yaml_settings(m) for m in
                     ("ibo", "pbo", "ga", "ga_kl", "npo", "simnpo", "remove", "oracle")}
