"""Connecting to Ray and sizing workers: the only place that calls ``ray.init``."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

from operators.errors import UserError

# Every Ray worker process we start inherits these.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}
# Ray's single-machine mode (every address 127.0.0.1): only for a local Ray of our own; the
# workers of a cluster keep the cluster's own setting.
SINGLE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass(frozen=True)
class ClusterConfig:
    """Where and how wide the distributed stages run (the ``cluster`` config group)."""

    address: str = ""  # empty: connect to RAY_ADDRESS / a running cluster, else start a local Ray
    num_workers: int = 2
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    batch_size: int = 16
    local_cpus: int | None = None  # CPUs of a local Ray started by the run (None: all)
    placement_strategy: str = "PACK"  # SPREAD puts workers on different nodes
    autoscale: bool = False  # True: wait (up to autoscale_timeout_s) for workers that do not fit
    autoscale_timeout_s: float = 900.0

    def scaling(self):
        """Ray Train's ScalingConfig for this cluster."""
        from ray.train import ScalingConfig
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                             resources_per_worker=resources,
                             placement_strategy=self.placement_strategy)

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise UserError(f"cluster.num_workers={self.num_workers}: must be >= 1")
        if self.batch_size < 1:
            raise UserError(f"cluster.batch_size={self.batch_size}: must be >= 1")
        if not self.cpus_per_worker > 0:
            raise UserError(f"cluster.cpus_per_worker={self.cpus_per_worker}: must be > 0")
        if not self.gpus_per_worker >= 0:
            raise UserError(f"cluster.gpus_per_worker={self.gpus_per_worker}: must be >= 0")
        if self.threads_per_worker < 1:
            raise UserError(f"cluster.threads_per_worker={self.threads_per_worker}: must be >= 1")
        if self.local_cpus is not None and self.local_cpus < 1:
            raise UserError(f"cluster.local_cpus={self.local_cpus}: must be >= 1 or null")
        if not self.autoscale_timeout_s > 0:
            raise UserError(f"cluster.autoscale_timeout_s={self.autoscale_timeout_s}: must be > 0")
        strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
        if self.placement_strategy not in strategies:
            raise UserError(f"cluster.placement_strategy={self.placement_strategy!r}: expected "
                             f"one of {strategies}")

    def actor_options(self) -> dict:
        """Ray options of one pool actor (scoring): its resources, and SPREAD over the nodes
        when the workers are to be spread, so the pool does not pile onto one host."""
        options = {"num_cpus": self.cpus_per_worker, "num_gpus": self.gpus_per_worker or None}
        if self.placement_strategy in ("SPREAD", "STRICT_SPREAD"):
            options["scheduling_strategy"] = "SPREAD"
        return options

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def backend(self) -> str:
        """The collective: NCCL across GPUs, gloo on CPUs."""
        return "nccl" if self.use_gpu else "gloo"


def connect(config: ClusterConfig) -> None:
    """``ray.init`` unless already connected (so ``ray job submit`` and local runs share code).

    A local Ray started here listens on 127.0.0.1 only (Ray's single-machine mode, read when
    Ray is first imported) and runs no dashboard. Then waits for the workers to fit, or fails
    at once when they never can (``cluster.capacity``).
    """
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    if not ray.is_initialized():
        _init(config, address)
    from cluster.capacity import wait_for_capacity
    wait_for_capacity(config.num_workers, config.cpus_per_worker, config.gpus_per_worker,
                      config.autoscale, config.autoscale_timeout_s)


def _init(config: ClusterConfig, address: str | None) -> None:
    import ray
    env_vars = {**WORKER_ENV, "OMP_NUM_THREADS": str(config.threads_per_worker)}
    if address:
        key = "cluster.address" if config.address else "RAY_ADDRESS"
        check_reachable(address, key)
        try:
            ray.init(address=address, runtime_env={"env_vars": env_vars}, log_to_driver=False)
        except (ConnectionError, TimeoutError, ValueError) as err:
            raise UserError(f"{key}={address}: cannot join the Ray cluster there ({err})"
                            ) from err
    else:
        env = {"env_vars": {**env_vars, **SINGLE_MACHINE}}
        # "local": a new Ray of our own, even if another local cluster is running
        ray.init(address="local", num_cpus=config.local_cpus, runtime_env=env,
                 include_dashboard=False,
                 log_to_driver=False)  # workers' logs stay in Ray's session folder


def check_reachable(address: str, key: str, timeout_s: float = 10.0) -> None:
    """A ``host:port`` or ``ray://host:port`` where nothing answers fails here, at once:
    ``ray.init`` retries such an address without end (a run sat for minutes printing
    "Failed to get cluster ID from GCS server"). ``auto`` is Ray's own to resolve."""
    if address == "auto":
        return
    target = address.split("://", 1)[-1]  # ray://, or any scheme Ray accepts
    host, _, port = target.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{key}={address}: expected host:port, ray://host:port or auto")
    why = unreachable(host.strip("[]"), int(port), timeout_s)
    if why:
        raise UserError(f"{key}={address}: no Ray cluster answers there ({why})")


def unreachable(host: str, port: int, timeout_s: float = 10.0) -> str | None:
    """Why nothing accepts a TCP connection at ``host:port`` (None: something does)."""
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as err:
        return str(err.strerror or err)
    return None


def storage_uri(path: str | Path) -> str:
    """Ray Train's ``storage_path``: a URI (``s3://``, ``gs://``) as given, a folder absolute.

    On several nodes it must be storage every node sees (NFS or a bucket).
    """
    text = str(path)
    if "://" in text:
        return text
    folder = Path(text).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


def pin_threads(threads: int) -> None:
    """Keep a worker to its share of the cores: torch processes on 2 cores fight otherwise."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(max(1, threads))


def device_for(config: ClusterConfig) -> str:
    return "cuda" if config.use_gpu and torch.cuda.is_available() else "cpu"


def remove_run_storage(storage: str | Path, name: str) -> int:
    """Delete a finished Ray Train run's folder (its checkpoints) from ``storage``; returns the
    bytes it held (0 where unknown or already gone). Its result was installed elsewhere."""
    import pyarrow.fs as pafs
    fs, base = pafs.FileSystem.from_uri(storage_uri(storage))
    folder = f"{base.rstrip('/')}/{name}"
    try:
        infos = fs.get_file_info(pafs.FileSelector(folder, recursive=True))
        fs.delete_dir(folder)
    except (FileNotFoundError, OSError):
        return 0
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)
