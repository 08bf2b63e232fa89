"""The typed configuration: Hydra composes ``conf/``; this schema validates it (errors name the
key) and ``to_typed`` converts it once into these dataclasses. Nothing below the entry point
sees OmegaConf."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


@dataclass
class ModelConf:
    # A Hugging Face causal-LM directory; empty: the demo trains one in `prepare`.
    path: str = ""
    # Precision of the model's forward and backward in every stage: float32 | bfloat16 |
    # float16 | float64 (statistics, IHVPs and scores always accumulate in float32 or better).
    dtype: str = "float32"
    # Never run code shipped with a model unless the user says so.
    trust_remote_code: bool = False
    # Tokens per sequence; longer samples are truncated (and counted) or refused.
    max_length: int = 128
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


@dataclass
class InfluenceConf:
    # linfac | ekfac | kfac | gradsim | repsim
    method: str = "linfac"
    # The Pareto cut sizing the influence sets, in (0, 1].
    alpha: float = 0.8
    max_fraction: float = 0.2
    # Queries averaged into one preconditioned query (1 = single-query mode).
    query_batch_size: int = 1
    # How per-batch scores combine: max | mean.
    aggregate: str = "max"
    # gradsim only: dot | cosine.
    similarity: str = "dot"
    # sampled (true Fisher) | empirical (the data's labels).
    fisher: str = "sampled"
    # λ = damping · mean(Λ) per unit, unless damping_absolute is set.
    damping: float = 0.1
    damping_absolute: float | None = None
    # ekfac/kfac/gradsim: only the linear modules whose name contains this (e.g. "lora_" for
    # the adapters of a LoRA-tuned model); empty: all of the blocks' linear modules.
    module_filter: str = ""
    # Keep each preconditioned query as rank-r factors per unit (memory r(o+i) instead of o·i;
    # 32 lets 64+ queries fit a 7B scorer); null: full rank.
    query_rank: int | None = None


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
    # ibo | pbo | ga | remove | oracle (demo only: needs ground truth)
    method: str = "ibo"
    beta: float = 0.1
    gamma: float = 1.0
    steps: int = 30
    lr: float = 5e-4
    # Rows of each dataset per step per worker.
    batch_size: int = 8
    checkpoint_every: int = 10
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


@dataclass
class ClusterConf:
    # A Ray address; empty: RAY_ADDRESS or a running cluster, else a local Ray.
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


@dataclass
class LancetConf:
    model: ModelConf = field(default_factory=ModelConf)
    data: DataConf = field(default_factory=DataConf)
    demo: DemoConf = field(default_factory=DemoConf)
    influence: InfluenceConf = field(default_factory=InfluenceConf)
    ibo: IBOConf = field(default_factory=IBOConf)
    judge: JudgeConf = field(default_factory=JudgeConf)
    cluster: ClusterConf = field(default_factory=ClusterConf)
    mlflow: MlflowConf = field(default_factory=MlflowConf)
    pipeline: PipelineConf = field(default_factory=PipelineConf)
    output_dir: str = "outputs/lancet"
    # Stage outputs by fingerprint, shared by reruns and sweep jobs.
    cache_dir: str = ".lancet_cache"
    seed: int = 0


def register() -> None:
    """Register the schema so every composed YAML is validated against it (and the resolvers
    the YAML uses)."""
    from pipeline.locations import register_resolvers
    register_resolvers()
    ConfigStore.instance().store(name="lancet_schema", node=LancetConf)


def to_typed(cfg) -> LancetConf:
    """OmegaConf → dataclasses, once, at the entry point."""
    from omegaconf import OmegaConf
    return OmegaConf.to_object(cfg)
