"""Non-finite gradients are reported, not propagated; security defaults hold."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pipeline_cli import ROOT, env
from tiny_models import random_batch, tiny_model

from cluster.scoring import finalize
from cluster.tracking import flatten
from operators.curvature import NONFINITE, covariance_pass, fit_curvature
from operators.scores import InfluenceConfig, precondition_queries, score_batch
from operators.units import discover_units

POISON = 7  # a token whose input embedding is NaN (a corrupt sample's effect)


def poisoned_model_and_batch():
    model = tiny_model("gpt2", tie_word_embeddings=False)
    batch = random_batch(batch=6, seed=3)
    batch["input_ids"][batch["input_ids"] == POISON] = 8
    batch["input_ids"][2, 4] = POISON  # only sample 2 holds it
    with torch.no_grad():
        model.transformer.wte.weight[POISON] = float("nan")
    return model, batch


def test_a_nan_sample_is_dropped_from_the_factors_and_counted():
    model, batch = poisoned_model_and_batch()
    units = discover_units(model, "linfac")
    stats = covariance_pass(model, units, [batch], fisher="empirical")
    assert float(stats[NONFINITE][0]) == 1
    assert all(torch.isfinite(v).all() for v in stats.values())


def test_a_nan_sample_is_reported_by_id_and_the_others_keep_their_scores(tmp_path):
    model, batch = poisoned_model_and_batch()
    config = InfluenceConfig(fisher="empirical")
    units = discover_units(model, "linfac")
    clean = {k: v[[0, 1, 3, 4, 5]] for k, v in batch.items()}
    curvature = fit_curvature(model, units, [clean], fisher="empirical")
    queries = precondition_queries(model, units, [random_batch(batch=2, seed=9)], config,
                                   curvature)
    raw = score_batch(model, units, batch, queries, config).numpy()
    assert not np.isfinite(raw[2]).all() and np.isfinite(np.delete(raw, 2, axis=0)).all()
    ids = [f"s{i}" for i in range(6)]
    flat = pa.array(raw.reshape(-1), type=pa.float64())
    (tmp_path / "raw").mkdir()
    pq.write_table(pa.table({"id": ids, "raw": pa.FixedSizeListArray.from_arrays(flat, 2)}),
                   tmp_path / "raw" / "0.parquet")
    summary = finalize(tmp_path / "raw", tmp_path / "ranked", "max")
    assert summary["nonfinite_ids"] == ["s2"]
    table = pq.read_table(tmp_path / "ranked").to_pydict()
    ranked = dict(zip(table["id"], table["rank"]))
    assert ranked["s2"] == 6  # last
    assert all(np.isfinite(s) for i, s in zip(table["id"], table["score"]) if i != "s2")


def test_secret_looking_config_values_are_not_logged():
    params = flatten({"mlflow": {"tracking_uri": "http://x", "password": "p"},
                      "cloud": {"api_key": "k", "AWS_SECRET_ACCESS_KEY": "s", "token": "t"},
                      "influence": {"alpha": 0.8}})
    assert params == {"mlflow.tracking_uri": "http://x", "influence.alpha": "0.8"}


def test_nothing_the_pipeline_reads_back_is_unpickled():
    pattern = re.compile(r"\bpickle\b|torch\.load\(|weights_only\s*=\s*False|joblib")
    offenders = [str(p) for package in ("operators", "cluster", "pipeline")
                 for p in (ROOT / package).rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_trust_remote_code_is_off_unless_asked():
    from cluster.factor_job import FactorSpec
    from cluster.ibo_job import IBOSpec
    from cluster.scoring import ScoreSpec
    from pipeline.config import ModelConf
    assert ModelConf().trust_remote_code is False
    assert FactorSpec("m").trust_remote_code is False
    assert ScoreSpec("m").trust_remote_code is False
    assert IBOSpec("m", "c").trust_remote_code is False


def test_a_local_ray_started_by_the_run_binds_loopback():
    code = ("from cluster.runtime import ClusterConfig, connect\n"
            "connect(ClusterConfig(num_workers=1, local_cpus=2))\n"
            "import ray\nprint('NODE', ray.nodes()[0]['NodeManagerAddress'])\n")
    clean_env = {k: v for k, v in env().items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env,
                         capture_output=True, text=True, timeout=180)
    assert "NODE 127.0.0.1" in out.stdout, out.stderr[-2000:]


def test_docs_start_servers_on_loopback():
    readme = (ROOT / "README.md").read_text()
    for command in re.findall(r"(mlflow (?:server|ui)[^\n`]*|ray start --head[^\n`]*)", readme):
        assert "127.0.0.1" in command, command
    assert Path(ROOT / "tests" / "servers.py").read_text().count('"127.0.0.1"') >= 3
