"""The MLflow adapter: one parent run per invocation, one nested run per stage, driver only.

Runs are always ended (``finally``), with status FAILED when a stage raised, so a failed sweep
job does not leave an active run that poisons the next one. Config values whose key looks like a
secret are never logged as parameters.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SECRET = re.compile(r"(pass(word)?|secret|token|api[_-]?key|credential|private)", re.IGNORECASE)
MAX_PARAM = 500  # MLflow's limit on a parameter value's length


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


class Tracker:
    """Thin wrapper over ``mlflow``; a disabled tracker does nothing."""

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.uri = tracking_uri
        if enabled:
            import mlflow
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_experiment(experiment)
            self.mlflow = mlflow

    @contextmanager
    def parent(self, name: str, params: dict, config_file: Path | None) -> Iterator[str | None]:
        if not self.enabled:
            yield None
            return
        run = self.mlflow.start_run(run_name=name)
        status = "FAILED"
        try:
            self.mlflow.log_params(flatten(params))
            if config_file is not None:
                self.mlflow.log_artifact(str(config_file))
            yield run.info.run_id
            status = "FINISHED"
        finally:
            self.mlflow.end_run(status=status)

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

    def artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.enabled or not path.exists():
            return
        if path.is_dir():
            self.mlflow.log_artifacts(str(path), artifact_path)
        else:
            self.mlflow.log_artifact(str(path), artifact_path)
