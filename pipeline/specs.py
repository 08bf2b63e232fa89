"""Typed config → the specs ``cluster/`` runs with (the one place that maps one onto the other)."""

from __future__ import annotations

from pathlib import Path

from cluster.batches import TokenizeConfig
from cluster.eval_job import EvalSpec
from cluster.factor_job import FactorSpec
from cluster.ibo_job import IBOSpec, LoraSpec
from cluster.ibo_objectives import ObjectiveConfig
from cluster.runtime import ClusterConfig
from cluster.scoring import ScoreSpec
from operators.factors import DampingConfig
from operators.ibo_loss import IBOLossConfig
from operators.scores import InfluenceConfig
from operators.selection import SelectionConfig
from pipeline.config import LancetConf

PROJECT = Path(__file__).resolve().parents[1]


def tokenize(cfg: LancetConf) -> TokenizeConfig:
    return TokenizeConfig(max_length=cfg.model.max_length, truncate=cfg.model.truncate,
                          train_on_prompt=cfg.model.train_on_prompt, seed=cfg.seed,
                          template=cfg.data.template)


def eval_spec(cfg: LancetConf, tokenizer_path: str) -> EvalSpec:
    return EvalSpec(tokenizer_path=tokenizer_path, dtype=cfg.model.dtype, tokenize=tokenize(cfg),
                    max_new_tokens=cfg.judge.max_new_tokens, batch_size=cfg.cluster.batch_size,
                    trust_remote_code=cfg.model.trust_remote_code)


def damping(cfg: LancetConf) -> DampingConfig:
    return DampingConfig(relative=cfg.influence.damping, absolute=cfg.influence.damping_absolute)


def influence(cfg: LancetConf) -> InfluenceConfig:
    i = cfg.influence
    return InfluenceConfig(method=i.method, query_batch_size=i.query_batch_size,
                           aggregate=i.aggregate, similarity=i.similarity, fisher=i.fisher,
                           damping=damping(cfg), module_filter=i.module_filter,
                           query_rank=i.query_rank)


def selection(cfg: LancetConf) -> SelectionConfig:
    return SelectionConfig(alpha=cfg.influence.alpha, max_fraction=cfg.influence.max_fraction)


def cluster(cfg: LancetConf) -> ClusterConfig:
    c = cfg.cluster
    return ClusterConfig(address=c.address, num_workers=c.num_workers,
                         cpus_per_worker=c.cpus_per_worker, gpus_per_worker=c.gpus_per_worker,
                         threads_per_worker=c.threads_per_worker, batch_size=c.batch_size,
                         num_cpus_local=c.local_cpus, placement_strategy=c.placement_strategy)


def factor_spec(cfg: LancetConf, model_path: str) -> FactorSpec:
    return FactorSpec(model_path=model_path, method=influence(cfg).method, fisher=cfg.influence.fisher,
                      dtype=cfg.model.dtype, damping=damping(cfg), tokenize=tokenize(cfg),
                      trust_remote_code=cfg.model.trust_remote_code,
                      module_filter=cfg.influence.module_filter)


def score_spec(cfg: LancetConf, model_path: str) -> ScoreSpec:
    return ScoreSpec(model_path=model_path, influence=influence(cfg), dtype=cfg.model.dtype,
                     tokenize=tokenize(cfg), trust_remote_code=cfg.model.trust_remote_code)


def ibo_spec(cfg: LancetConf, model_path: str) -> IBOSpec:
    b = cfg.ibo
    ds_path = Path(b.deepspeed_config)
    if not ds_path.is_absolute():
        ds_path = PROJECT / ds_path
    lora = LoraSpec(enabled=b.lora.enabled, r=b.lora.r, alpha=b.lora.alpha, dropout=b.lora.dropout,
                    target_modules=tuple(b.lora.target_modules), save=b.lora.save)
    objective = ObjectiveConfig(method=b.method, loss=IBOLossConfig(beta=b.beta, gamma=b.gamma),
                                bregman_topk=b.bregman_topk, tokenize=tokenize(cfg))
    return IBOSpec(model_path=model_path, deepspeed_config=str(ds_path), objective=objective,
                   steps=b.steps, lr=b.lr, batch_size=b.batch_size,
                   checkpoint_every=b.checkpoint_every,
                   keep_checkpoints=cfg.cluster.keep_checkpoints,
                   precompute_reference=b.precompute_reference, dtype=cfg.model.dtype, lora=lora,
                   reinit=b.reinit, trust_remote_code=cfg.model.trust_remote_code)


def validate(cfg: LancetConf) -> None:
    """Build every spec once at start-up so a bad value fails before any stage runs."""
    tokenize(cfg)
    influence(cfg)
    selection(cfg)
    cluster(cfg)
    ibo_spec(cfg, cfg.model.path or "model")
    from pipeline.judge import judge_config
    judge_config(cfg.judge)
    if cfg.data.format not in ("prompt_response", "hh_rlhf", "beavertails"):
        raise ValueError(f"data.format={cfg.data.format!r}: expected prompt_response, hh_rlhf "
                         "or beavertails")
    if cfg.model.dtype not in ("float32", "float64", "bfloat16", "float16"):
        raise ValueError(f"model.dtype={cfg.model.dtype!r}: expected float32, float64, bfloat16 "
                         "or float16")
