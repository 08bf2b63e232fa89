"""The pipeline against a real MLflow server, and submitted with ``ray job submit``."""

import json
import subprocess
import time

import pytest
from pipeline_cli import ROOT, copy_cache, env
from servers import BIN, mlflow_server, ray_head

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STAGE_NAMES = {"prepare", "fit_factors", "score", "select", "ibo", "evaluate", "report"}
# The submitted run computes these, evaluate's generation as Ray tasks on the cluster it is
# submitted to; it reuses the shared demo run's other stages (Ray Train jobs on a cluster the
# pipeline connects to: tests/test_two_nodes.py; the demo's quality: tests/test_pipeline.py).
ON_THE_CLUSTER = ("evaluate", "report")


def test_the_demo_submitted_to_a_cluster_corrects_and_logs_to_an_mlflow_server(demo_run,
                                                                              tmp_path):
    """`make demo`'s run submitted as a user submits to a cluster: the job runs on the cluster
    it is submitted to, lands in a stable folder, and its runs, metrics and plots reach a real
    MLflow server, cached stages tagged as such."""
    cache = copy_cache(demo_run[0], tmp_path / "cache",
                       stages=tuple(STAGE_NAMES - set(ON_THE_CLUSTER)))
    with mlflow_server(tmp_path / "mlflow") as uri, ray_head(tmp_path) as head:
        out, logs = submit(head, tmp_path / "home", f"mlflow.tracking_uri={uri}",
                           "mlflow.experiment=lancet-test", f"cache_dir={cache}")
        assert_on_the_server(uri)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    shared = json.loads((demo_run[1] / "eval" / "metrics.json").read_text())
    assert set(metrics) == set(shared)  # the same models, evaluated on the cluster
    assert metrics["behavior/undesirable_rate_after"] <= 0.5 * metrics[
        "behavior/undesirable_rate_before"]
    assert "recall AUPRC" in logs and "undesirable, unseen" in logs
    assert (out / "ibo" / "model" / "config.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert set(run["stages"]) == STAGE_NAMES
    assert {n for n, s in run["stages"].items() if not s["cached"]} == set(ON_THE_CLUSTER)


def submit(head, home, *overrides: str) -> tuple:
    """``ray job submit`` the pipeline with no output_dir; the run's output folder and logs.

    Without output_dir the run must land in a stable folder (~/.lancet), not under the job's
    temporary working directory that Ray deletes with the job."""
    runtime_env = json.dumps({"env_vars": {"HOME": str(home)}})
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"],
           "--working-dir", str(ROOT), "--runtime-env-json", runtime_env, "--no-wait",
           "--", "python", "-m", "pipeline", *overrides]
    submitted = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300,
                               stdin=subprocess.DEVNULL)
    assert submitted.returncode == 0, submitted.stderr
    job_id = next(line.split("'")[1] for line in submitted.stdout.splitlines()
                  if "submitted successfully" in line)
    status = wait_job(head["dashboard"], job_id)
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", head["dashboard"],
                           job_id], env=env(), capture_output=True, text=True, timeout=60)
    assert status == "SUCCEEDED", logs.stdout[-4000:]
    assert "LANCET summary" in logs.stdout
    runs = list((home / ".lancet" / "outputs").glob("*/*/run.json"))
    assert len(runs) == 1, logs.stdout[-4000:]
    assert f"output_dir: {runs[0].parent}" in logs.stdout
    return runs[0].parent, logs.stdout


def assert_on_the_server(uri: str) -> None:
    """One parent run with a child per stage, metrics, config and plots."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("lancet-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.info.run_name: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == STAGE_NAMES
    assert {n: r.data.tags["lancet.cached"] for n, r in children.items()} == {
        n: str(n not in ON_THE_CLUSTER).lower() for n in STAGE_NAMES}
    assert "detect/auprc" in children["evaluate"].data.metrics
    assert "behavior/undesirable_rate_after" in parent.data.metrics
    assert "influence.alpha" in parent.data.params
    assert any(a.path == "config.yaml" for a in client.list_artifacts(parent.info.run_id))
    report = client.list_artifacts(children["report"].info.run_id, "report")
    assert {"report/score_distribution.png", "report/undesirable_rate.png"} <= {
        a.path for a in report}


def wait_job(address: str, job_id: str, timeout: float = 900) -> str:
    from ray.job_submission import JobSubmissionClient
    client = JobSubmissionClient(address)
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    return "TIMEOUT"
