"""Running ``python -m pipeline`` as a user does, in a subprocess, and reading what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
       "HYDRA_FULL_ERROR": "1"}


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


def stages(output_dir: Path) -> dict[str, dict]:
    return json.loads((output_dir / "run.json").read_text())["stages"]


def computed(output_dir: Path) -> set[str]:
    return {name for name, s in stages(output_dir).items() if not s["cached"]}
