"""Typed config → the specs ``cluster/`` runs with (the one place that maps one onto the other)."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from cluster.batches import TokenizeConfig
from cluster.dataio import FORMATS
from cluster.eval_job import EvalSpec
from cluster.factor_job import FactorSpec
from cluster.ibo_job import IBOSpec, LoraSpec
from cluster.ibo_objectives import ObjectiveConfig
from cluster.model_io import DTYPES
from cluster.relearn_job import RelearnSpec
from cluster.runtime import ClusterConfig
from cluster.scoring import ScoreSpec
from operators.errors import UserError
from operators.factors import DampingConfig
from operators.ibo_loss import IBOLossConfig
from operators.scores import InfluenceConfig
from operators.selection import SelectionConfig
from pipeline.config import LancetConf, conf_dir, max_length_of
from pipeline.records import VERIFY_MODES

PROJECT = Path(__file__).resolve().parents[1]


def tokenize(cfg: LancetConf) -> TokenizeConfig:
    return TokenizeConfig(max_length=max_length_of(cfg), truncate=cfg.model.truncate,
                          train_on_prompt=cfg.model.train_on_prompt, seed=cfg.seed,
                          template=cfg.data.template)


def eval_spec(cfg: LancetConf, tokenizer_path: str) -> EvalSpec:
    return EvalSpec(tokenizer_path=tokenizer_path, dtype=cfg.model.dtype, tokenize=tokenize(cfg),
                    max_new_tokens=cfg.judge.max_new_tokens, batch_size=cfg.cluster.batch_size,
                    trust_remote_code=cfg.model.trust_remote_code,
                    clean_prompts=cfg.eval.clean_prompts)


def relearn_spec(cfg: LancetConf) -> RelearnSpec | None:
    """The relearning measurement (None when ``eval.relearn_steps`` is empty)."""
    if not cfg.eval.relearn_steps:
        return None
    lr = cfg.ibo.lr if cfg.eval.relearn_lr is None else cfg.eval.relearn_lr
    if cfg.eval.relearn_lr is not None and not lr > 0:  # ibo.lr is checked by its own spec
        raise UserError(f"eval.relearn_lr={lr}: must be > 0")
    return RelearnSpec(steps=tuple(int(k) for k in cfg.eval.relearn_steps),
                       samples=cfg.eval.relearn_samples, lr=lr,
                       batch_size=cfg.ibo.batch_size, seed=cfg.seed)


def damping(cfg: LancetConf) -> DampingConfig:
    return DampingConfig(relative=cfg.influence.damping, absolute=cfg.influence.damping_absolute)


def influence(cfg: LancetConf) -> InfluenceConfig:
    i = cfg.influence
    return InfluenceConfig(method=i.method, query_batch_size=i.query_batch_size,
                           aggregate=i.aggregate, similarity=i.similarity, fisher=i.fisher,
                           logodds_cap=i.logodds_cap,
                           damping=damping(cfg), module_filter=i.module_filter,
                           query_rank=i.query_rank, query_grouping=i.query_grouping,
                           query_parts=tuple(i.query_parts), opening_tokens=i.opening_tokens,
                           opening_outside_judged=i.opening_outside_judged,
                           expand_top_k=i.expand_top_k)


def judge_patterns(cfg: LancetConf) -> tuple[str, ...]:
    """The keyword judge's patterns where they judge this run's outputs (the demo's patterns
    never judge the user's data), else none: the ``judged`` query part then stays out."""
    j = cfg.judge
    if j.kind != "keyword" or (j.demo and cfg.data.train):
        return ()
    return tuple(j.patterns)


def selection(cfg: LancetConf) -> SelectionConfig:
    return SelectionConfig(alpha=cfg.influence.alpha, max_fraction=cfg.influence.max_fraction,
                           pair_power=cfg.influence.pair_power)


def cluster(cfg: LancetConf) -> ClusterConfig:
    c = cfg.cluster
    return ClusterConfig(address=c.address, num_workers=c.num_workers,
                         cpus_per_worker=c.cpus_per_worker, gpus_per_worker=c.gpus_per_worker,
                         threads_per_worker=c.threads_per_worker, batch_size=c.batch_size,
                         local_cpus=c.local_cpus, placement_strategy=c.placement_strategy,
                         autoscale=c.autoscale, autoscale_timeout_s=c.autoscale_timeout_s)


def factor_spec(cfg: LancetConf, model_path: str) -> FactorSpec:
    return FactorSpec(model_path=model_path, method=influence(cfg).method, fisher=cfg.influence.fisher,
                      logodds_cap=influence(cfg).logodds_cap,
                      dtype=cfg.model.dtype, damping=damping(cfg), tokenize=tokenize(cfg),
                      trust_remote_code=cfg.model.trust_remote_code,
                      module_filter=cfg.influence.module_filter)


def score_spec(cfg: LancetConf, model_path: str) -> ScoreSpec:
    return ScoreSpec(model_path=model_path, influence=influence(cfg), dtype=cfg.model.dtype,
                     tokenize=tokenize(cfg), trust_remote_code=cfg.model.trust_remote_code,
                     attribution_top_k=cfg.influence.attribution_top_k,
                     attribution_contrast=cfg.influence.attribution_contrast,
                     judge_patterns=judge_patterns(cfg))


def deepspeed_path(cfg: LancetConf) -> Path:
    """Relative paths are the project's; ``conf/…`` is also found in an installed LANCET."""
    path = Path(cfg.ibo.deepspeed_config)
    if path.is_absolute() or (PROJECT / path).is_file():
        return path if path.is_absolute() else PROJECT / path
    if path.parts[:1] == ("conf",):
        return conf_dir().joinpath(*path.parts[1:])
    return PROJECT / path


def ibo_spec(cfg: LancetConf, model_path: str) -> IBOSpec:
    b = cfg.ibo
    ds_path = deepspeed_path(cfg)
    lora = LoraSpec(enabled=b.lora.enabled, r=b.lora.r, alpha=b.lora.alpha, dropout=b.lora.dropout,
                    target_modules=tuple(b.lora.target_modules), save=b.lora.save)
    loss = IBOLossConfig(beta=b.beta, gamma=b.gamma, delta=b.delta, granularity=b.granularity,
                         rejected_tokens=b.rejected_tokens)
    objective = ObjectiveConfig(method=b.method, loss=loss,
                                bregman_topk=b.bregman_topk, tokenize=tokenize(cfg))
    return IBOSpec(model_path=model_path, deepspeed_config=str(ds_path), objective=objective,
                   steps=b.steps, lr=b.lr, batch_size=b.batch_size,
                   checkpoint_every=b.checkpoint_every,
                   keep_checkpoints=cfg.cluster.keep_checkpoints,
                   precompute_reference=b.precompute_reference, dtype=cfg.model.dtype, lora=lora,
                   reinit=b.reinit, trust_remote_code=cfg.model.trust_remote_code)


def demo_model(cfg: LancetConf):
    from pipeline.demo.model import TinyModelConfig
    d = cfg.demo
    return TinyModelConfig(width=d.width, layers=d.layers, heads=d.heads,
                           context=max_length_of(cfg), epochs=d.epochs, lr=d.lr, seed=d.seed)


def _check_ranges(cfg: LancetConf) -> None:
    """The numeric keys no spec consumes (the others are checked by their spec)."""
    if not 0 < cfg.demo.bad_rate <= 1:
        raise UserError(f"demo.bad_rate={cfg.demo.bad_rate}: must be in (0, 1]")
    if cfg.judge.max_new_tokens < 1:
        raise UserError(f"judge.max_new_tokens={cfg.judge.max_new_tokens}: must be >= 1")
    if cfg.judge.max_new_tokens >= max_length_of(cfg):
        raise UserError(f"judge.max_new_tokens={cfg.judge.max_new_tokens}: leaves no room for "
                        f"the prompt within model.max_length={max_length_of(cfg)}")
    if not cfg.cluster.progress_every_s > 0:
        raise UserError(f"cluster.progress_every_s={cfg.cluster.progress_every_s}: must be > 0")
    if cfg.cluster.max_failures < -1:
        raise UserError(f"cluster.max_failures={cfg.cluster.max_failures}: must be >= 0 "
                         "(-1: retry forever)")
    if cfg.cluster.score_shard_rows < 1:
        raise UserError(f"cluster.score_shard_rows={cfg.cluster.score_shard_rows}: must be >= 1")
    if cfg.mlflow.enabled and not cfg.mlflow.experiment.strip():
        raise UserError("mlflow.experiment is empty: name the MLflow experiment (or "
                         "mlflow.enabled=false)")


def _check_finite(node, prefix: str = "") -> None:
    """Every number of the config is finite: inf passes a `> 0` check and then breaks a job
    (an infinite ibo.lr trained a model of NaNs that the run registered)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{key}={value}: must be a finite number")


def check_inputs(cfg: LancetConf, corrects: bool = True) -> None:
    """The files the config names, as far as a glance can tell (the rows are read by prepare);
    ``corrects``: the run goes as far as the correction (its DeepSpeed JSON and the classifier
    judge of the evaluation after it are read)."""
    from cluster.model_checks import (
        check_classifier_dir,
        check_lora_targets,
        check_model_fits,
        check_units,
        weightless_model,
    )
    from cluster.model_io import check_model_dir
    if cfg.model.path:
        trust = cfg.model.trust_remote_code
        check_model_dir(cfg.model.path)
        check_model_fits(cfg.model.path, max_length_of(cfg), trust)
        model = weightless_model(cfg.model.path, trust)  # built once for the checks below
        uncovered = check_units(cfg.model.path, cfg.influence.method,
                                cfg.influence.module_filter, trust, model)
        if uncovered:
            logging.getLogger("lancet").warning(
                f"warning: influence.method={cfg.influence.method}: {len(uncovered)} weight "
                "matrices of the model's blocks are not linear modules and get no curvature, "
                f"so they add nothing to the scores (e.g. {', '.join(uncovered[:3])}); "
                "influence.method=linfac covers every sublayer")
        if corrects and cfg.ibo.lora.enabled:
            check_lora_targets(cfg.model.path, cfg.ibo.lora.target_modules, trust, model)
    if corrects:
        if cfg.ibo.method == "oracle" and cfg.data.train and not cfg.data.label_column:
            raise UserError("ibo.method=oracle retrains on the truly clean rows: set "
                            "data.label_column to the boolean column of data.train that marks "
                            "the contaminated rows")
        from cluster.deepspeed_strategy import read_ds_config
        read_ds_config(deepspeed_path(cfg))
        if cfg.judge.kind == "classifier":
            check_classifier_dir(cfg.judge.path, cfg.judge.label)


def validate(cfg: LancetConf) -> None:
    """Build every spec once at start-up so a bad value fails before any stage runs."""
    tokenize(cfg)
    influence(cfg)
    score_spec(cfg, cfg.model.path or "model")
    selection(cfg)
    cluster(cfg)
    ibo_spec(cfg, cfg.model.path or "model")
    demo_model(cfg)
    _check_ranges(cfg)
    eval_spec(cfg, cfg.model.path or "model")
    relearn_spec(cfg)
    from pipeline.judge import judge_config
    judge_config(cfg.judge)
    if cfg.data.format not in FORMATS:
        raise UserError(f"data.format={cfg.data.format!r}: expected one of {', '.join(FORMATS)}")
    if cfg.model.dtype not in DTYPES:
        raise UserError(f"model.dtype={cfg.model.dtype!r}: expected one of {', '.join(DTYPES)}")
    if cfg.pipeline.verify not in VERIFY_MODES:
        raise UserError(f"pipeline.verify={cfg.pipeline.verify!r}: expected one of "
                         f"{', '.join(VERIFY_MODES)}")
    _check_finite(cfg)  # last: the specs' own range checks name NaN their way
