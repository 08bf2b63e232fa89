"""The embedded demo as `make demo` runs it (default settings), end to end."""

import json

import pytest
from pipeline_cli import run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_demo_recalls_the_planted_data_and_halves_the_undesirable_rate(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("cluster.local_cpus=2", f"cache_dir={tmp_path / 'cache'}", f"output_dir={out}")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    print({k: round(v, 3) for k, v in metrics.items()})
    assert metrics["detect/auprc"] >= 0.9
    for key in ("behavior/undesirable_rate", "behavior/undesirable_rate_unseen"):
        assert metrics[f"{key}_before"] > 0
        assert metrics[f"{key}_after"] <= 0.5 * metrics[f"{key}_before"]
    assert metrics["utility/ppl_after"] <= 1.1 * metrics["utility/ppl_before"]
    assert "recall AUPRC" in proc.stdout and "undesirable, unseen" in proc.stdout
