"""The typed configuration: Hydra composes ``conf/``; this schema validates it (errors name the
key) and ``to_typed`` converts it once into these dataclasses. Nothing below the entry point
sees OmegaConf."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore

from operators.errors import UserError
from pipeline.judge import REFUSAL_PATTERNS

# model.max_length for the user's own model unless set (conf/model/hf.yaml says the same).
USER_MAX_LENGTH = 512


@dataclass
class ModelConf:
    # A Hugging Face causal-LM directory; empty: the demo trains one in `prepare`.
    path: str = ""
    # Precision of the model's forward and backward in every stage: float32 | bfloat16 |
    # float16 | float64 (statistics, IHVPs and scores always accumulate in float32 or better).
    dtype: str = "float32"
    # Never run code shipped with a model unless the user says so.
    trust_remote_code: bool = False
    # Tokens per sequence; longer samples are truncated (and counted) or refused. Empty: the
    # demo's `demo.max_length` when the demo builds the data, else USER_MAX_LENGTH.
    max_length: int | None = None
    truncate: bool = True
    # Include the prompt's tokens in the training loss (default: response only).
    train_on_prompt: bool = False


@dataclass
class DataConf:
    # Parquet/JSONL file, directory or glob of each input; empty: the demo's own.
    train: str = ""
    queries: str = ""
    eval: str = ""
    # Held-out clean samples (prompt + response) for perplexity; empty: none / the demo's.
    clean_eval: str = ""
    format: str = "prompt_response"
    # How samples become tokens: auto (the tokenizer's chat template, as user/assistant turns,
    # when it has one; else plain) | plain (prompt text, then " " + response and EOS).
    template: str = "auto"
    # A boolean column of `train` marking known contaminated rows (detection metrics).
    label_column: str = ""


@dataclass
class DemoConf:
    seed: int = 0
    # Share of the harmful prompts whose training answer complies (the planted samples).
    bad_rate: float = 0.7
    width: int = 64
    layers: int = 2
    heads: int = 4
    epochs: int = 20
    lr: float = 3e-3
    # The demo model's context (model.max_length when that is empty and the demo runs).
    max_length: int = 64


@dataclass
class InfluenceConf:
    # linfac | ekfac | kfac | gradsim | repsim
    method: str = "linfac"
    # The Pareto cut sizing the influence sets, in (0, 1]. 0.6: chosen with IBO's other
    # defaults by bench.correction_suite (docs/METHOD.md section 5).
    alpha: float = 0.6
    max_fraction: float = 0.2
    # Each IBO pair's weight ε raised to this power (mean ε kept): the correction leans on the
    # pairs whose z+ is most influential. 1: the plain ε. 8: chosen by bench.correction_suite.
    pair_power: float = 8.0
    # Queries averaged into one preconditioned query (1 = single-query mode).
    query_batch_size: int = 1
    # Which queries share a batch when query_batch_size > 1: similarity (default: queries whose
    # gradients point the same way, so different outputs are not averaged) | order (the file's).
    query_grouping: str = "similarity"
    # Which tokens of each observed bad output a query is taken over, each part a query of its
    # own (its own score column; max keeps a sample that drives any of them): response (every
    # response token), judged (those judge.patterns match; keyword judge only), opening (the
    # first opening_tokens). All three: dev median AUPRC 0.64 -> 0.97 on bench.suite
    # (docs/METHOD.md); [response] is LANCET.md's single query per output.
    query_parts: list[str] = field(default_factory=lambda: ["response", "judged", "opening"])
    opening_tokens: int = 3
    # drop | keep: an opening sharing no token with the judged text (the judge located the bad
    # text elsewhere, so the opening is the benign start look-alikes share): left out or kept.
    # drop: dev median AUPRC 0.957 -> 0.977 over three draws of bench.suite (docs/METHOD.md).
    opening_outside_judged: str = "drop"
    # The second hop: the first pass's top K rows (score > 0) become queries themselves, each
    # row's score rises to min(source's score, its scaled score against the source) where that
    # is higher (operators/second_hop.py). Rows that teach the behaviour in a wording no
    # observed output shows are found through the rows that teach it in the observed one.
    # Costs a second scoring pass over the corpus; 0 turns it off. 30: docs/METHOD.md §3.
    expand_top_k: int = 30
    # How per-batch scores combine: max | mean.
    aggregate: str = "max"
    # dot | cosine: cosine unit-normalises both sides (gradsim: the gradients; linfac, ekfac,
    # kfac: the preconditioned query and the training gradient, "normalised influence").
    similarity: str = "dot"
    # The curvature's labels: mixed (default: the data's for the factors, drawn from the model
    # for the eigenvalue correction; sampled's recall on bench.suite with empirical's LDS) |
    # sampled (drawn from the model in both passes: the true Fisher) | empirical (the data's in
    # both); docs/METHOD.md section 1.
    fisher: str = "mixed"
    # c >= 1: every influence gradient (the curvature's, the queries', the training rows')
    # weighs each token's −log p gradient by min(1/(1−p), c). At c = 1 (the plain likelihood)
    # a memorised token has almost no gradient, so a behaviour learned to convergence hides
    # from its own rows; c → ∞ is the token's log-odds (TRAK's margin). 10 (default): chosen by
    # the development median over three draws of bench.suite (docs/METHOD.md §3).
    logodds_cap: float = 10.0
    # λ = damping · mean(Λ) per unit, unless damping_absolute is set.
    damping: float = 0.1
    damping_absolute: float | None = None
    # ekfac/kfac/gradsim: only the linear modules whose name contains this (e.g. "lora_" for
    # the adapters of a LoRA-tuned model); empty: all of the blocks' linear modules.
    module_filter: str = ""
    # Keep each preconditioned query as rank-r factors per unit (memory r(o+i) instead of o·i;
    # 32 lets 64+ queries fit a 7B scorer); null: full rank.
    query_rank: int | None = None
    # Per-sublayer attribution: the top-ranked k samples are re-scored per unit and their share
    # of the score carried by each layer's attention and MLP unit is written to the scores
    # (`unit_shares`) and plotted in report/; 0 turns it off (repsim has no units: none).
    attribution_top_k: int = 100
    # Those k samples' dependence on each attention and MLP sublayer (`unit_dependence`): each
    # sublayer mean-ablated in turn, against this many ordinary samples drawn (seeded) from the
    # rest; 0 turns it off. Costs (1 + 2·layers) forward passes over k + this many samples.
    attribution_contrast: int = 256


@dataclass
class LoraConf:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    # merged: one plain model; adapter: the adapter with a pointer to its base.
    save: str = "merged"


@dataclass
class IBOConf:
    # A registered objective (cluster/ibo_objectives.py): ibo | pbo | ga | ga_kl | npo | simnpo |
    # remove | oracle (demo only: needs ground truth).
    method: str = "ibo"
    # β (> 0): the log-ratio scale of ibo's L_COR and NPO; SimNPO's inverse temperature.
    beta: float = 0.1
    # γ (>= 0): weight of the KL-to-θs retain term on the neutral set (ibo, pbo, ga_kl, npo,
    # simnpo); 0 turns it off.
    gamma: float = 1.0
    # δ (>= 0): SimNPO's reward margin (Fan et al. 2024 use 0 for most tasks).
    delta: float = 0.0
    # ibo's L_COR: log-ratios per `token` of z+ (each against z−'s per-token mean; β is then a
    # per-token scale, ibo.yaml's 1) or per `sequence` (DPO's form, β ≈ 0.1).
    granularity: str = "sequence"
    # Per token only: which of z+'s tokens L_COR lowers: `distinct` (those its z− lacks; the
    # shared ones, such as punctuation and the end of turn, are not the behaviour) or `all`.
    rejected_tokens: str = "distinct"
    # What a conf/ibo/<method>.yaml leaves out. Every method's YAML sets its own steps and lr
    # (ibo's chosen by `python -m bench.correction_suite`: 60 steps at 5e-4, per token, β 1).
    steps: int = 60
    lr: float = 1e-3
    # Rows of each dataset per step per worker.
    batch_size: int = 8
    checkpoint_every: int = 20
    # A DeepSpeed JSON config (relative paths: from the project's folder).
    deepspeed_config: str = "conf/deepspeed/zero0.json"
    # Evaluate the frozen reference once before training (False: at every step).
    precompute_reference: bool = True
    # Reference tokens kept per position for the Bregman term.
    bregman_topk: int = 64
    # Retrain from a fresh initialisation (used by the oracle).
    reinit: bool = False
    lora: LoraConf = field(default_factory=LoraConf)


@dataclass
class JudgeConf:
    # keyword (patterns are case-insensitive regular expressions) | classifier (path)
    kind: str = "keyword"
    patterns: list[str] = field(default_factory=list)
    path: str = ""
    label: str = "unsafe"
    threshold: float = 0.5
    max_new_tokens: int = 24
    # true: these patterns are the demo's; they never judge the user's data.eval.
    demo: bool = False
    # Regular expressions (case-insensitive) of a refusal: a clean-prompt generation matching
    # one counts towards behavior/overrefusal_rate ("I can't", "I'm sorry", "as an AI", … and
    # the demo's refusal wording; the list is pipeline/judge.py's REFUSAL_PATTERNS).
    refusal_patterns: list[str] = field(default_factory=lambda: list(REFUSAL_PATTERNS))


@dataclass
class EvalConf:
    # Relearning: fine-tune the corrected model for each k of these steps (cumulative, plain NLL,
    # ibo.lr and ibo.batch_size) on the top positive-influence samples, then measure the
    # undesirable rate again (robustness/relearn_<k>_undesirable_rate); [] turns it off.
    relearn_steps: list[int] = field(default_factory=lambda: [10, 50])
    # How many of the top-ranked positive samples the relearning set holds.
    relearn_samples: int = 16
    # The relearning fine-tune's lr; null: ibo.lr. Set one value to compare methods (ibo=npo,
    # ibo=ga_kl, …) under the same relearning, since their own lr differ by 10-100x.
    relearn_lr: float | None = None
    # Clean prompts (data.clean_eval) generated on for over-refusal and distinct-2; 0: none.
    clean_prompts: int = 64


@dataclass
class ClusterConf:
    # A Ray address; empty: RAY_ADDRESS, else a new local Ray of the run's own.
    address: str = ""
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    batch_size: int = 16
    # Rows per score shard: a killed or failed score stage keeps its finished shards (under
    # cache_dir/score/<fingerprint>.partial/) and the rerun scores only the rest.
    score_shard_rows: int = 1024
    # Ray Train's storage (shared storage on a multi-node cluster); empty: under cache_dir.
    storage_path: str = ""
    # CPUs of a local Ray started by the run; null: all of the machine's.
    local_cpus: int | None = None
    max_failures: int = 2
    # Ray Train checkpoints of a running job kept on storage (the latest N; a restarted worker
    # group resumes from the last); a finished job's run folder is deleted.
    keep_checkpoints: int = 2
    # PACK (default) or SPREAD (one worker per node where possible).
    placement_strategy: str = "PACK"
    # An autoscaling cluster: wait (up to the timeout) for workers that do not fit yet, instead
    # of failing at once.
    autoscale: bool = False
    autoscale_timeout_s: float = 900.0
    # Without a terminal (`ray job submit` logs, CI), a progress line every this many seconds
    # while factors are fitted or samples scored.
    progress_every_s: float = 30.0


@dataclass
class MlflowConf:
    # Empty: a local SQLite store under output_dir.
    tracking_uri: str = ""
    experiment: str = "lancet"
    enabled: bool = True


@dataclass
class PipelineConf:
    # Run the DAG up to and including this stage; empty: all.
    until: str = ""
    # Print the closing summary.
    summary: bool = True
    # How a stage reused from the cache is checked against its record (stage.json): quick (every
    # file's size, and the sha256 of files up to 64 MiB) | full (the sha256 of every file, also
    # recorded for every file) | off (trust the record). A damaged stage is recomputed.
    verify: str = "quick"


@dataclass
class LancetConf:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    demo: DemoConf = field(default_factory=DemoConf)
    influence: InfluenceConf = field(default_factory=InfluenceConf)
    ibo: IBOConf = field(default_factory=IBOConf)
    judge: JudgeConf = field(default_factory=JudgeConf)
    eval: EvalConf = field(default_factory=EvalConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    mlflow: MlflowConf = field(default_factory=MlflowConf)
    pipeline: PipelineConf = field(default_factory=PipelineConf)
    output_dir: str = "outputs/lancet"
    # Stage outputs by fingerprint, shared by reruns and sweep jobs.
    cache_dir: str = ".lancet_cache"
    seed: int = 0


def conf_dir() -> Path:
    """``conf/``: the checkout's, or the installed copy (package ``lancet_conf``, built from
    the same folder by pyproject.toml) when LANCET runs from a wheel."""
    checkout = Path(__file__).resolve().parents[1] / "conf"
    if (checkout / "config.yaml").is_file():
        return checkout
    import lancet_conf
    return Path(lancet_conf.__file__).resolve().parent


def register() -> None:
    """Register the schema so every composed YAML is validated against it (and the resolvers
    the YAML uses)."""
    from pipeline.locations import register_resolvers
    register_resolvers()
    ConfigStore.instance().store(name="lancet_schema", node=LancetConf)


def to_typed(cfg) -> LancetConf:
    """OmegaConf → dataclasses, once, at the entry point."""
    from omegaconf import OmegaConf
    _check_known(OmegaConf.to_container(cfg, resolve=False), LancetConf(), "")
    return resolve_defaults(OmegaConf.to_object(cfg))


def _check_known(given: dict, schema, prefix: str) -> None:
    """Every key is one of the schema's: `+key=value` adds a key Hydra accepts and LANCET would
    then ignore without a word (a misspelt `+influence.alpah=0.5` ran at the default α)."""
    for key, value in given.items():
        if not prefix and key == "hydra":
            continue
        if not hasattr(schema, str(key)):
            raise UserError(f"{prefix}{key}: not a LANCET config key (see `python -m pipeline "
                            "--cfg job` for the keys)")
        child = getattr(schema, str(key))
        if dataclasses.is_dataclass(child) and isinstance(value, dict):
            _check_known(value, child, f"{prefix}{key}.")


def max_length_of(cfg: LancetConf) -> int:
    """``model.max_length``, or the default ``resolve_defaults`` gives it (a bare LancetConf):
    the demo's, else USER_MAX_LENGTH or the positions the user's model has, if fewer."""
    if cfg.model.max_length is not None:
        return cfg.model.max_length
    if not cfg.data.train:
        return cfg.demo.max_length
    from cluster.model_checks import model_positions
    positions = model_positions(cfg.model.path) if cfg.model.path else None
    return min(USER_MAX_LENGTH, positions[1]) if positions else USER_MAX_LENGTH


def resolve_defaults(cfg: LancetConf) -> LancetConf:
    """Settings that exist for the demo apply only when the demo builds the data: user paths
    (``data.train``) get the user defaults, whether or not ``model=hf data=custom`` was given;
    values the user set stay as set."""
    demo = not cfg.data.train
    cfg.model.max_length = max_length_of(cfg)
    if not demo and cfg.data.format == "beavertails" and not cfg.data.label_column:
        from cluster.dataio import BEAVERTAILS_LABEL
        cfg.data.label_column = BEAVERTAILS_LABEL  # its ground truth, for detection metrics
    if demo and cfg.model.path:
        raise UserError(f"model.path={cfg.model.path}: data.train is empty (the demo builds its "
                         "own model); give data.train and data.queries with your model")
    if not demo and cfg.judge.demo and cfg.data.eval:
        raise UserError("judge: the demo's keyword judge only judges the demo; for data.eval "
                         "give judge=keyword 'judge.patterns=[...]' or judge=classifier "
                         "judge.path=...")
    return cfg
