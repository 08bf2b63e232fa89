"""Run one benchmark section alone (``python -m bench.<section> [--quick]``) and print its rows."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from cluster.runtime import ClusterConfig, connect


def run_section(name: str, measure: Callable[[Path, bool], dict]) -> None:
    """``measure(work_dir, quick)`` on a local 2-CPU Ray; prints a Markdown row per result."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    connect(ClusterConfig(local_cpus=2))
    work = Path(tempfile.mkdtemp(prefix=f"lancet_{name}_"))
    try:
        for key, value in measure(work, args.quick).items():
            print(f"| {key} | {value if isinstance(value, str) else f'{value:.3f}'} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
