"""Distributed factor fitting: a Ray Train worker group, Ray Data shards, one all-reduce per pass.

Each worker streams its shard of the corpus, accumulates factor sums and counts
(``operators.curvature.covariance_pass``), all-reduces them, eigendecomposes (every worker ends
with the same eigenbases), streams its shard again for the eigenvalue correction and all-reduces
that. Rank 0 writes the result as a Ray Train checkpoint; the driver moves it under
``factors/``. Fisher labels are drawn per sample from a seed derived from the sample's id, so
the factors do not depend on the number of workers or the batch size.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.allreduce import allreduce_sum, world
from cluster.atomic import atomic
from cluster.batches import TokenizeConfig, to_tensors
from cluster.model_io import DTYPES, load_model, load_tokenizer
from cluster.progress import report
from cluster.runtime import ClusterConfig, device_for, pin_threads, remove_run_storage, storage_uri
from cluster.user_errors import fit_torch_trainer
from operators.curvature import (
    DEFAULT_FISHER,
    DEFAULT_LOGODDS_CAP,
    NONFINITE,
    Curvature,
    covariance_pass,
    lambda_pass,
)
from operators.factors import DampingConfig, Eigen, eigendecompose, stat_dtype
from operators.methods import get_method
from operators.units import Unit, discover_units

FACTOR_FILE = "factors.safetensors"


@dataclass(frozen=True)
class FactorSpec:
    """What to fit: model, units, Fisher kind, damping, tokenization."""

    model_path: str
    method: str = "linfac"  # linfac | ekfac | kfac
    fisher: str = DEFAULT_FISHER
    logodds_cap: float = DEFAULT_LOGODDS_CAP  # of every gradient (influence.logodds_cap)
    dtype: str = "float32"
    damping: DampingConfig = field(default_factory=DampingConfig)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    trust_remote_code: bool = False
    module_filter: str = ""

    @property
    def corrected(self) -> bool:
        return get_method(self.method).eigen_correction


def zero_stats(units: list[Unit], which: str, dtype: torch.dtype = torch.float64,
               device: str = "cpu") -> dict[str, torch.Tensor]:
    """All-zero sums, so a worker with an empty shard still joins the all-reduce.

    Sums in ``dtype`` (the statistics dtype), counts in float64, as ``covariance_pass`` and
    ``lambda_pass`` make them.
    """
    def z(*shape, kind=dtype):
        return torch.zeros(*shape, dtype=kind, device=device)
    out = {NONFINITE: z(1, kind=torch.float64)}
    for u in units:
        o, i = u.shape
        if which == "covariance":
            out.update({f"{u.name}/a_sum": z(i, i), f"{u.name}/a_count": z(1, kind=torch.float64),
                        f"{u.name}/s_sum": z(o, o), f"{u.name}/s_count": z(1, kind=torch.float64)})
        else:
            out.update({f"{u.name}/lambda_sum": z(o, i),
                        f"{u.name}/lambda_count": z(1, kind=torch.float64)})
    return out


def eigendecompose_shared(stats: dict[str, torch.Tensor], units: list[Unit], device: str
                          ) -> dict[str, Eigen]:
    """``eigh`` of every unit in float64 on ``device``, the units shared round-robin among the
    workers, each result summed across them one unit at a time and kept in host memory.

    Worker r decomposes units r, r + W, …; the others send zeros, so the all-reduce sum hands
    every worker every eigenbasis (one worker decomposes each unit: no sign ambiguity). The
    float64 bases go to host memory: the device keeps only the float32 copies the next pass uses.
    """
    rank, size = world()
    out = {}
    for index, unit in enumerate(units):
        o, i = unit.shape
        if index % size == rank:
            eig = eigendecompose(stats, [unit])[unit.name]
            parts = {"qa": eig.qa, "a": eig.a, "qs": eig.qs, "s": eig.s}
        else:
            parts = {k: torch.zeros(shape, dtype=torch.float64, device=device) for k, shape in
                     (("qa", (i, i)), ("a", (i,)), ("qs", (o, o)), ("s", (o,)))}
        if size > 1:
            parts = allreduce_sum({f"{unit.name}/{k}": v for k, v in parts.items()}, device)
            parts = {k.rsplit("/", 1)[1]: v for k, v in parts.items()}
        out[unit.name] = Eigen(*(parts[k].cpu() for k in ("qa", "a", "qs", "s")))
    return out


def _shard_batches(shard, tokenizer, spec: FactorSpec, batch_size: int, device: str, counter,
                   progress=None):
    for columns in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        batch = to_tensors(columns, tokenizer, spec.tokenize, device)
        sequences, tokens = int(batch["input_ids"].shape[0]), int(batch["attention_mask"].sum())
        counter["sequences"] += sequences
        counter["tokens"] += tokens
        yield batch
        report(progress, sequences, tokens)


def factor_worker(config: dict) -> None:
    """Ray Train ``train_func``: fit on this worker's shard, all-reduce, checkpoint on rank 0."""
    import ray.train
    spec: FactorSpec = config["spec"]
    cluster: ClusterConfig = config["cluster"]
    pin_threads(cluster.threads_per_worker)
    device = device_for(cluster)
    model = load_model(spec.model_path, spec.dtype, get_method(spec.method).attention_weights,
                       spec.trust_remote_code, device)
    tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
    units = discover_units(model, spec.method, spec.module_filter)
    shard = ray.train.get_dataset_shard("train")
    counter = {"sequences": 0, "tokens": 0}
    start = time.perf_counter()
    progress = config.get("progress")
    dtype = stat_dtype(DTYPES[spec.dtype])
    batches = _shard_batches(shard, tokenizer, spec, cluster.batch_size, device, counter, progress)
    stats = (covariance_pass(model, units, batches, spec.fisher, logodds_cap=spec.logodds_cap)
             or zero_stats(units, "covariance", dtype, device))
    stats = allreduce_sum(stats, device)
    eigens = eigendecompose_shared(stats, units, device)
    stats = {k: v for k, v in stats.items() if not k.endswith("_sum")}  # free A, S: only
    lam = None  # the counts are kept
    if spec.corrected:
        batches = _shard_batches(shard, tokenizer, spec, cluster.batch_size, device, counter,
                                 progress)
        lam = (lambda_pass(model, units, eigens, batches, spec.fisher,
                           logodds_cap=spec.logodds_cap)
               or zero_stats(units, "lambda", dtype, device))
        lam = allreduce_sum(lam, device)
    curvature = Curvature.build(eigens, lam, spec.corrected, spec.damping)
    seconds = time.perf_counter() - start
    _report(curvature, stats, lam, units, counter, seconds, device)


def passes(spec: FactorSpec) -> int:
    """How many times fitting streams the corpus: covariances, then the eigenvalue correction."""
    return 2 if spec.corrected else 1


def _report(curvature, stats, lam, units, counter, seconds, device) -> None:
    import ray.train
    from safetensors.torch import save_file
    rank, size = world()
    totals = allreduce_sum({k: torch.tensor([float(v)], dtype=torch.float64, device=device)
                            for k, v in counter.items()}, device)
    metrics = {"sequences": float(totals["sequences"][0]) / (2 if lam is not None else 1),
               "tokens": float(totals["tokens"][0]) / (2 if lam is not None else 1),
               "seconds": seconds, "workers": size}
    metrics["nonfinite_sequences"] = float(stats[NONFINITE][0])
    metrics["sequences_per_s"] = metrics["sequences"] / max(seconds, 1e-9)
    metrics["tokens_per_s"] = metrics["tokens"] / max(seconds, 1e-9)
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        tensors = curvature.to_tensors()
        tensors.update({f"stats/{k}": v.cpu().contiguous() for k, v in stats.items()
                        if k.endswith("_count")})
        save_file(tensors, str(Path(tmp) / FACTOR_FILE))
        (Path(tmp) / "units.json").write_text(json.dumps(
            [{"name": u.name, "shape": list(u.shape), "mix_tokens": u.mix_tokens} for u in units]))
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def fit_factors(dataset, spec: FactorSpec, cluster: ClusterConfig, out_dir: Path,
                storage: str | Path, max_failures: int = 2, progress=None) -> dict:
    """Run the worker group on ``dataset`` (a Ray Dataset of id/prompt/response rows).

    Writes ``out_dir/factors.safetensors`` and ``out_dir/units.json`` and returns the
    throughput metrics. A worker that dies is retried up to ``max_failures`` times from scratch:
    fitting is deterministic, so the factors equal an undisturbed run's. ``progress``: a
    ``cluster.progress.Progress`` counter the workers feed (``passes(spec)`` × rows in all).
    """
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchConfig
    name = f"fit_factors_{int(time.time() * 1000)}"
    try:
        result = fit_torch_trainer(
            factor_worker, {"spec": spec, "cluster": cluster, "progress": progress},
            scaling_config=cluster.scaling(),
            torch_config=TorchConfig(backend=cluster.backend),
            datasets={"train": dataset},
            run_config=RunConfig(name=name, storage_path=storage_uri(storage),
                                 failure_config=FailureConfig(max_failures=max_failures)),
        )
        with result.checkpoint.as_directory() as ckpt:
            _install(Path(ckpt), out_dir)
            return json.loads((Path(ckpt) / "metrics.json").read_text())
    finally:  # the factors are installed under out_dir: no second copy on storage
        remove_run_storage(storage, name)


def _install(src: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (FACTOR_FILE, "units.json"):
        with atomic(out_dir / name) as tmp:
            shutil.copyfile(src / name, tmp)


def load_curvature(factor_dir: Path) -> tuple[Curvature, list[str]]:
    """The curvature saved by ``fit_factors`` (safetensors only: nothing is unpickled)."""
    from safetensors.torch import load_file
    names = [u["name"] for u in json.loads((factor_dir / "units.json").read_text())]
    tensors = load_file(str(factor_dir / FACTOR_FILE))
    return Curvature.from_tensors(tensors, names), names

