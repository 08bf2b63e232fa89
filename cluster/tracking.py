"""The MLflow adapter: one parent run per invocation, one nested run per stage, driver only.

Runs are always ended (``finally``), with status FAILED when a stage raised, so a failed sweep
job does not leave an active run that poisons the next one. Config values whose key looks like a
secret are never logged as parameters. A sweep's jobs are nested under one run tagged with the
sweep's folder. With a SQLite store the experiment's artifacts go next to the database (not
``./mlruns`` in the current folder). A stage's artifacts are uploaded once per fingerprint: a
stage reused from the cache points at the run that holds them (``lancet.artifacts_run``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SECRET = re.compile(r"(pass(word)?|secret|token|api[_-]?key|credential|private)", re.IGNORECASE)
MAX_PARAM = 500  # MLflow's limit on a parameter value's length
BATCH = 1000  # metrics per log_batch call (MLflow's limit)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict → ``{"a.b": "value"}``, leaving out secret-looking keys."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if SECRET.search(str(key)):
            continue
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value)[:MAX_PARAM]
    return out


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store; else the server's."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Tracker:
    """Thin wrapper over ``mlflow``; a disabled tracker does nothing."""

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.uri = tracking_uri
        self.experiment = experiment
        if enabled:
            import mlflow
            mlflow.set_tracking_uri(tracking_uri)
            if mlflow.get_experiment_by_name(experiment) is None:
                mlflow.create_experiment(experiment, artifact_location(tracking_uri))
            self.experiment_id = mlflow.set_experiment(experiment).experiment_id
            self.mlflow = mlflow

    @contextmanager
    def parent(self, name: str, params: dict, config_file: Path | None,
               sweep: str = "") -> Iterator[str | None]:
        """The invocation's run; in a sweep, nested under the sweep's run."""
        if not self.enabled:
            yield None
            return
        run = self.mlflow.start_run(run_name=name, parent_run_id=self._sweep_run(sweep),
                                    tags={"lancet.sweep": sweep} if sweep else None)
        status = "FAILED"
        try:
            self.mlflow.log_params(flatten(params))
            if config_file is not None:
                self.mlflow.log_artifact(str(config_file))
            yield run.info.run_id
            status = "FINISHED"
        finally:
            self.mlflow.end_run(status=status)

    def _sweep_run(self, sweep: str) -> str | None:
        """The run grouping a sweep's jobs (found by its tag, else created, already ended)."""
        if not sweep:
            return None
        found = self._search(f"tags.`lancet.sweep_root` = {_quoted(sweep)}")
        if found:
            return found
        client = self.mlflow.MlflowClient()
        run = client.create_run(self.experiment_id, run_name=f"sweep {Path(sweep).name}",
                                tags={"lancet.sweep_root": sweep})
        client.set_terminated(run.info.run_id)
        return run.info.run_id

    def _search(self, where: str) -> str | None:
        runs = self.mlflow.search_runs([self.experiment_id], filter_string=where,
                                       max_results=1, output_format="list")
        return runs[0].info.run_id if runs else None

    @contextmanager
    def stage(self, name: str, cached: bool, fingerprint: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self.mlflow.start_run(run_name=name, nested=True,
                              tags={"lancet.cached": str(cached).lower(),
                                    "lancet.fingerprint": fingerprint, "lancet.stage": name})
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        finally:
            self.mlflow.end_run(status=status)

    def metrics(self, values: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        if clean:
            self.mlflow.log_metrics(clean)

    def curve(self, path: Path) -> None:
        """Per-step metrics (a JSON line per step, with ``step``) as MLflow metric histories."""
        if not self.enabled or not path.is_file():
            return
        from mlflow.entities import Metric
        stamp = int(time.time() * 1000)
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        points = [Metric(k, float(v), stamp, int(row["step"])) for row in rows
                  for k, v in row.items() if k != "step" and isinstance(v, (int, float))]
        run_id = self.mlflow.active_run().info.run_id
        for start in range(0, len(points), BATCH):
            self.mlflow.MlflowClient().log_batch(run_id, metrics=points[start:start + BATCH])

    def logged_before(self, stage: str, fingerprint: str) -> str | None:
        """The run of this experiment that already holds this stage output's artifacts."""
        if not self.enabled:
            return None
        return self._search(f"tags.`lancet.fingerprint` = {_quoted(fingerprint)} and "
                            f"tags.`lancet.stage` = {_quoted(stage)} and "
                            "tags.`lancet.artifacts` = 'logged'")

    def tag(self, key: str, value: str) -> None:
        if self.enabled:
            self.mlflow.set_tag(key, value)

    def artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.enabled or not path.exists():
            return
        if path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path)
        else:
            self.mlflow.log_artifact(str(path), artifact_path)

    def model(self, path: Path, registered_name: str) -> None:
        """A Hugging Face causal-LM directory as an MLflow ``transformers`` model (a
        text-generation pipeline), registered as ``registered_name``."""
        if not self.enabled or not path.is_dir():
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer
        parts = {"model": AutoModelForCausalLM.from_pretrained(path),
                 "tokenizer": AutoTokenizer.from_pretrained(path)}
        # explicit requirements: inferring them imports every package the model might use
        self.mlflow.transformers.log_model(
            transformers_model=parts, name=path.name, task="text-generation",
            registered_model_name=registered_name, pip_requirements=["torch", "transformers"])
