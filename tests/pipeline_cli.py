"""Running ``python -m pipeline`` as a user does, in a subprocess, and reading what it wrote."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Ray Train's controller polls its workers every 2 s and starts a preemption watcher (one more
# actor process) per run: on the suite's tiny jobs that was about 4 s of each ~30 s Ray Train
# job. Tests poll at 0.5 s and do without the watcher (no node is ever preempted here).
RAY_TRAIN_QUICK = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                   "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
       "HYDRA_FULL_ERROR": "1", **RAY_TRAIN_QUICK}
# The shared run's overrides (conftest.demo_run): the embedded demo at its defaults, as
# `make demo` runs it, on the 2 CPUs of a test machine. Reruns against its cache repeat them.
DEMO = ("cluster.local_cpus=2",)


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    path = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"  # as if activated
    return {**out, **ENV, "PATH": path, **extra}


def run_cli(*overrides: str, timeout: int = 900, check: bool = True, prefix: tuple = (),
            **extra_env) -> subprocess.CompletedProcess:
    """``python -m pipeline overrides...``; ``prefix`` runs it elsewhere (``ip netns exec h``)."""
    proc = subprocess.run([*prefix, sys.executable, "-m", "pipeline", *overrides], cwd=ROOT,
                          env=env(**extra_env), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"pipeline failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def copy_cache(cache: Path, to: Path, stages: tuple[str, ...] | None = None) -> Path:
    """A private copy of a cache (only ``stages``' folders when given), to damage or extend
    without touching the shared run's."""
    shutil.copytree(cache, to, symlinks=True, ignore=shutil.ignore_patterns("_ray_train", ".*"))
    if stages is not None:
        for folder in to.iterdir():
            if folder.is_dir() and folder.name not in stages:
                shutil.rmtree(folder)
    return to


def stages(output_dir: Path) -> dict[str, dict]:
    return json.loads((output_dir / "run.json").read_text())["stages"]


def computed(output_dir: Path) -> set[str]:
    return {name for name, s in stages(output_dir).items() if not s["cached"]}
