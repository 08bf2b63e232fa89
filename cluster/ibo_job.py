"""IBO (and its baselines) as a Ray Train ``TorchTrainer`` whose workers run DeepSpeed.

Each worker reads its shard of the selection's Parquet datasets through Ray Data, evaluates the
frozen reference θs once on those rows (unless ``precompute_reference=False``), wraps θs (or
LoRA adapters on it) in DeepSpeed, and steps through its rows cyclically. Every
``checkpoint_every`` steps all ranks save a DeepSpeed checkpoint that Ray Train persists; a
restarted worker group resumes from the latest one. The last checkpoint also holds the corrected
model as a Hugging Face directory (safetensors), which the driver installs under ``ibo/model``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.allreduce import world
from cluster.atomic import atomic
from cluster.deepspeed_strategy import DeepSpeedStrategy, read_ds_config, resolve_ds_config
from cluster.ibo_objectives import ObjectiveConfig, Reference, step_loss
from cluster.model_io import load_model, load_tokenizer
from cluster.runtime import ClusterConfig, device_for, pin_threads, remove_run_storage, storage_uri
from cluster.user_errors import fit_torch_trainer
from operators.errors import UserError

MODEL_DIR = "model"
CURVE = "curve.jsonl"  # one line of metrics per step (``step`` included), rank 0's


@dataclass(frozen=True)
class LoraSpec:
    """Correct through LoRA adapters instead of the full weights (peft)."""

    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # empty: every linear module of the blocks
    save: str = "merged"  # merged | adapter

    def __post_init__(self) -> None:
        if self.save not in ("merged", "adapter"):
            raise UserError(f"ibo.lora.save={self.save!r}: expected merged or adapter")
        if int(self.r) < 1:
            raise UserError(f"ibo.lora.r={self.r}: must be >= 1")
        if not self.alpha > 0:
            raise UserError(f"ibo.lora.alpha={self.alpha}: must be > 0")
        if not 0 <= self.dropout < 1:
            raise UserError(f"ibo.lora.dropout={self.dropout}: must be in [0, 1)")


@dataclass(frozen=True)
class IBOSpec:
    """One correction run."""

    model_path: str
    deepspeed_config: str
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    steps: int = 60
    lr: float = 1e-3
    batch_size: int = 8
    checkpoint_every: int = 20
    keep_checkpoints: int = 2  # Ray Train keeps the latest N; the run's folder goes at the end
    precompute_reference: bool = True
    dtype: str = "float32"
    lora: LoraSpec = field(default_factory=LoraSpec)
    reinit: bool = False  # oracle: retrain from a fresh initialisation
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        for key in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"ibo.{key}={getattr(self, key)}: must be >= 1")
        if not self.lr > 0:
            raise UserError(f"ibo.lr={self.lr}: must be > 0")


def _take(rows: list[dict], step: int, size: int) -> list[dict]:
    start = (step * size) % len(rows)
    return [rows[(start + i) % len(rows)] for i in range(min(size, len(rows)))]


def _policy(spec: IBOSpec, device: str, dtype: str):
    model = load_model(spec.model_path, dtype, False, spec.trust_remote_code, device)
    if spec.reinit:
        model.apply(model._init_weights)  # the oracle retrains from scratch
    if spec.lora.enabled:
        from peft import LoraConfig, get_peft_model
        targets = list(spec.lora.target_modules) or "all-linear"
        config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha,
                            lora_dropout=spec.lora.dropout, target_modules=targets,
                            task_type="CAUSAL_LM")
        try:
            model = get_peft_model(model, config)
        except ValueError as err:  # peft's "target modules … not found" (the start check's too)
            raise UserError(f"ibo.lora.target_modules={targets}: {err}") from err
    return model.eval()  # no dropout: the reference was evaluated the same way


def _reference(spec: IBOSpec, tokenizer, rows, device) -> Reference | None:
    objective = spec.objective.objective
    if not objective.needs_reference:
        return None
    base = load_model(spec.model_path, spec.dtype, False, spec.trust_remote_code, device)
    ref = Reference(base, tokenizer, spec.objective, live=not spec.precompute_reference)
    if spec.precompute_reference:
        used = objective.reference_logp + objective.reference_topk
        ref.precompute({k: v for k, v in rows.items() if k in used}, device,
                       logp=objective.reference_logp, topk=objective.reference_topk)
        ref.model = None  # θs is no longer needed in memory
    return ref


def ibo_worker(config: dict) -> None:
    """Ray Train ``train_func``: one DeepSpeed worker of the correction job."""
    import ray.train
    spec: IBOSpec = config["spec"]
    cluster: ClusterConfig = config["cluster"]
    pin_threads(cluster.threads_per_worker)
    if not cluster.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is first imported
    device = device_for(cluster)
    tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
    rows = {name: list(ray.train.get_dataset_shard(name).iter_rows())
            for name in spec.objective.objective.datasets}
    empty = [name for name, r in rows.items() if not r]
    if empty:
        raise UserError(f"worker {world()[0]} got no rows of {empty}: fewer samples than "
                         "cluster.num_workers")
    ref = _reference(spec, tokenizer, rows, device)
    ds_config = resolve_ds_config(config["ds_config"], cluster.use_gpu, spec.dtype)
    strategy = DeepSpeedStrategy(ds_config, spec.lr)
    # DeepSpeed's bf16 mode casts a float32 model itself and keeps float32 master weights
    bf16 = ds_config.get("bf16", {}).get("enabled") is True
    engine = strategy.setup(_policy(spec, device, "float32" if bf16 else spec.dtype))
    start, curve = _resume(strategy)

    def after_step(step: int, metrics: dict, times: list[float]) -> None:
        if step % spec.checkpoint_every == 0 or step == spec.steps:
            metrics.update(step=step, resumed_from=start, step_seconds=sum(times) / len(times))
            _checkpoint(strategy, spec, tokenizer, step, metrics, curve)

    train_steps(engine, strategy.step, tokenizer, ref, rows, spec, device, start, curve,
                after_step)


def train_steps(model, update, tokenizer, ref: Reference | None, rows: dict[str, list[dict]],
                spec: IBOSpec, device: str, start: int = 0, curve: list[dict] | None = None,
                after_step=None) -> list[dict]:
    """Steps ``start`` … ``spec.steps`` of ``spec.objective``: each dataset's rows are cycled in
    batches of ``spec.batch_size``; ``update(loss)`` backpropagates and steps the optimizer (the
    DeepSpeed engine in the job). ``after_step(step, metrics, seconds)`` runs after each step
    (the job checkpoints there). Returns the per-step metrics, ``curve`` extended."""
    curve = [] if curve is None else curve
    times: list[float] = []
    for step in range(start, spec.steps):
        began = time.perf_counter()
        batch = {name: _take(r, step, spec.batch_size) for name, r in rows.items()}
        loss, metrics = step_loss(model, tokenizer, ref, batch, spec.objective, device)
        _check_finite(loss, step, spec)
        update(loss)
        times.append(time.perf_counter() - began)
        curve.append({**metrics, "step": step + 1, "step_seconds": times[-1]})
        if after_step is not None:
            after_step(step + 1, metrics, times)
    return curve


def _check_finite(loss, step: int, spec: IBOSpec) -> None:
    """Stop at a non-finite loss: every later step would train on it and the job would save
    (and the run register) a model of NaNs."""
    if bool(torch.isfinite(loss.detach()).all()):
        return
    cause = ("before any update: the model's own outputs are not finite (try model.dtype="
             "float32)" if step == 0 else "the model diverged: lower ibo.lr")
    raise UserError(f"ibo: the {spec.objective.method} loss is {float(loss.detach())} at step "
                    f"{step + 1} of {spec.steps} (ibo.lr={spec.lr:g}); {cause}")


def _resume(strategy: DeepSpeedStrategy) -> tuple[int, list[dict]]:
    """The steps already done and their per-step metrics (from the latest checkpoint)."""
    import ray.train
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        start = strategy.load(Path(directory) / "ds")
        curve = Path(directory) / CURVE
        lines = curve.read_text().splitlines() if curve.is_file() else []
        return start, [json.loads(line) for line in lines][:start]


def _checkpoint(strategy, spec: IBOSpec, tokenizer, step: int, metrics: dict,
                curve: list[dict]) -> None:
    import ray.train
    rank, _ = world()
    final = step == spec.steps
    state = strategy.full_state_dict() if final else None  # collective under ZeRO-3
    with tempfile.TemporaryDirectory() as tmp:
        strategy.save(Path(tmp) / "ds", step)
        if final and rank == 0:
            _save_model(strategy.engine.module, state, spec, tokenizer, Path(tmp) / MODEL_DIR)
        if rank == 0:
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
            (Path(tmp) / CURVE).write_text("".join(json.dumps(m) + "\n" for m in curve))
        # One name for every rank's part, so Ray Train merges them into one checkpoint.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{step:08d}")


def _save_model(module, state, spec: IBOSpec, tokenizer, out: Path) -> None:
    """The corrected model as a Hugging Face directory with safetensors weights."""
    if spec.lora.enabled and spec.lora.save == "merged":
        module = module.merge_and_unload()
        state = None
    elif spec.lora.enabled:
        state = None  # the adapter alone, with a pointer to its base model
    module.save_pretrained(out, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(out)


def run_ibo(datasets: dict, spec: IBOSpec, cluster: ClusterConfig, out_dir: Path,
            storage: str | Path, max_failures: int = 2) -> dict:
    """Run the correction job; install the model (and its per-step ``curve.jsonl``) under
    ``out_dir``; return its metrics. The job's checkpoints are deleted once it ended."""
    from ray.train.torch import TorchConfig
    config = run_config(spec, storage, max_failures)
    try:
        result = fit_torch_trainer(
            ibo_worker, {"spec": spec, "cluster": cluster,
                         "ds_config": read_ds_config(spec.deepspeed_config)},
            scaling_config=cluster.scaling(),
            torch_config=TorchConfig(backend=cluster.backend),
            datasets=datasets, dataset_config=in_file_order(), run_config=config)
        metrics = _install(result.checkpoint, out_dir)
    finally:
        removed = remove_run_storage(storage, config.name)
    return {**metrics, "checkpoint_mb_removed": removed / 2**20}


def in_file_order():
    """Ray Train's data config with the sets' rows kept in file order: a worker's batches (and
    so the corrected model) then depend on the selection alone, not on which read task of Ray
    Data finished first (the default lets blocks arrive in any order)."""
    from ray.train import DataConfig
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def run_config(spec: IBOSpec, storage: str | Path, max_failures: int):
    """Ray Train's RunConfig: a fresh run folder, the latest ``keep_checkpoints`` kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    return RunConfig(name=f"ibo_{int(time.time() * 1000)}", storage_path=storage_uri(storage),
                     failure_config=FailureConfig(max_failures=max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints))


def _install(checkpoint, out_dir: Path) -> dict:
    """Copy the final checkpoint's model and curve under ``out_dir``; its metrics."""
    with checkpoint.as_directory() as ckpt:
        with atomic(out_dir / MODEL_DIR) as tmp:
            shutil.copytree(Path(ckpt) / MODEL_DIR, tmp)
        shutil.copyfile(Path(ckpt) / CURVE, out_dir / CURVE)
        return json.loads((Path(ckpt) / "metrics.json").read_text())
