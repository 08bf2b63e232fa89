"""The pipeline against a real MLflow server, and submitted with ``ray job submit``."""

import json
import subprocess
import time

import pytest
from pipeline_cli import ROOT, env
from servers import BIN, mlflow_server, ray_head

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STAGE_NAMES = {"prepare", "fit_factors", "score", "select", "ibo", "evaluate", "report"}


def test_the_demo_submitted_to_a_cluster_recalls_corrects_and_logs_to_an_mlflow_server(
        tmp_path):
    """`make demo`'s run (default settings), submitted as a user submits to a cluster: it finds
    the planted data and halves the undesirable rate at the same perplexity; the job runs on
    the cluster it is submitted to; its runs, metrics and plots reach a real MLflow server."""
    with mlflow_server(tmp_path / "mlflow") as uri, ray_head(tmp_path) as head:
        out, logs = submit(head, tmp_path / "home", f"mlflow.tracking_uri={uri}",
                           "mlflow.experiment=lancet-test")
        assert_on_the_server(uri)
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    print({k: round(v, 3) for k, v in metrics.items()})
    assert metrics["detect/auprc"] >= 0.9
    for key in ("behavior/undesirable_rate", "behavior/undesirable_rate_unseen"):
        assert metrics[f"{key}_before"] > 0
        assert metrics[f"{key}_after"] <= 0.5 * metrics[f"{key}_before"]
    assert metrics["utility/ppl_after"] <= 1.1 * metrics["utility/ppl_before"]
    assert "recall AUPRC" in logs and "undesirable, unseen" in logs
    assert (out / "ibo" / "model" / "config.json").is_file()
    run = json.loads((out / "run.json").read_text())
    assert set(run["stages"]) == STAGE_NAMES


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
    assert {r.data.tags["lancet.cached"] for r in children.values()} == {"false"}
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
