"""The MLflow adapter: one parent run per invocation, one nested run per stage, driver only.

Runs are always ended (``finally``), with status FAILED when a stage raised, so a failed sweep
job does not leave an active run that poisons the next one. Config values whose key looks like a
secret are never logged as parameters.

The tracking store failing (a full disk under its SQLite file, a server gone) must not take the
run's results with it: the first failure is kept in ``failure``, logged once, and the tracker
stops calling MLflow; the caller reports it when the run ends. Stage outputs are already in the
cache before their metrics are logged.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SECRET = re.compile(r"(pass(word)?|secret|token|api[_-]?key|credential|private)", re.IGNORECASE)
MAX_PARAM = 500  # MLflow's limit on a parameter value's length
log = logging.getLogger("lancet")


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
    """Thin wrapper over ``mlflow``; a disabled (or failed) tracker does nothing."""

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.uri = tracking_uri
        self.failure: str | None = None  # the first error of the tracking store
        if enabled:
            import mlflow
            self.mlflow = mlflow
            self._call(mlflow.set_tracking_uri, tracking_uri)
            self._call(mlflow.set_experiment, experiment)

    def _call(self, fn, *args, **kwargs):
        """``fn(*args)`` unless the store already failed; a failure disables the tracker."""
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # any store error: sqlite, a server, an artifact write
            self.enabled, self.failure = False, store_cause(err)
            log.warning("warning: the MLflow tracking store %s failed: %s; "
                        "no more logging in this run", self.uri, self.failure)
            return None

    def _end(self, status: str) -> None:
        """End the active run even after a failure, so a sweep's next job starts clean."""
        try:
            self.mlflow.end_run(status=status)
        except Exception as err:
            if self.failure is None:
                self.enabled, self.failure = False, store_cause(err)

    @contextmanager
    def parent(self, name: str, params: dict, config_file: Path | None) -> Iterator[str | None]:
        run = self._call(self.mlflow.start_run, run_name=name) if self.enabled else None
        if run is None:
            yield None
            return
        status = "FAILED"
        try:
            self._call(self.mlflow.log_params, flatten(params))
            if config_file is not None:
                self._call(self.mlflow.log_artifact, str(config_file))
            yield run.info.run_id
            status = "FINISHED"
        finally:
            self._end(status)

    @contextmanager
    def stage(self, name: str, cached: bool, fingerprint: str) -> Iterator[None]:
        run = None
        if self.enabled:
            run = self._call(self.mlflow.start_run, run_name=name, nested=True,
                             tags={"lancet.cached": str(cached).lower(),
                                   "lancet.fingerprint": fingerprint, "lancet.stage": name})
        if run is None:
            yield
            return
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        finally:
            self._end(status)

    def metrics(self, values: dict) -> None:
        clean = {k: float(v) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        if clean and self.enabled:
            self._call(self.mlflow.log_metrics, clean)

    def tags(self, values: dict[str, str]) -> None:
        if self.enabled:
            self._call(self.mlflow.set_tags, values)

    def artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        if not self.enabled or not path.exists():
            return
        if path.is_dir():
            self._call(self.mlflow.log_artifacts, str(path), artifact_path)
        else:
            self._call(self.mlflow.log_artifact, str(path), artifact_path)


def store_cause(err: BaseException) -> str:
    """The innermost cause of a store error, one line (sqlite's words, not SQLAlchemy's SQL)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    err = getattr(err, "orig", None) or err  # SQLAlchemy keeps the DB-API error in .orig
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r"^\(\S+\)\s*", "", text)
