"""The MLflow adapter: one parent run per invocation, one nested run per stage, driver only.

Runs are always ended (``finally``), with status FAILED when a stage raised, so a failed sweep
job does not leave an active run that poisons the next one. Config values whose key looks like a
secret are never logged as parameters. A sweep's jobs are nested under one run tagged with the
sweep's folder. With a SQLite store the experiment's artifacts go next to the database (not
``./mlruns`` in the current folder). A stage's artifacts are uploaded once per fingerprint: a
stage reused from the cache points at the run that holds them (``lancet.artifacts_run``).

The tracking store failing (a full disk under its SQLite file, a server gone) must not take the
run's results with it: the first failure is kept in ``failure``, logged once, and the tracker
stops calling MLflow; the caller reports it when the run ends. Stage outputs are already in the
cache before their metrics are logged.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SECRET = re.compile(r"(pass(word)?|secret|token|api[_-]?key|credential|private)", re.IGNORECASE)
MAX_PARAM = 500  # MLflow's limit on a parameter value's length
BATCH = 1000  # metrics per log_batch call (MLflow's limit)
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


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: next to a SQLite store; else the server's."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Tracker:
    """Thin wrapper over ``mlflow``; a disabled (or failed) tracker does nothing."""

    def __init__(self, tracking_uri: str, experiment: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.uri = tracking_uri
        self.experiment = experiment
        self.failure: str | None = None  # the first error of the tracking store
        if enabled:
            import mlflow
            self.mlflow = mlflow
            # MLflow's SQL store logs each database error with its trace before raising it;
            # the error reaches the user as this tracker's one line (warning, then exit 3)
            logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
            self.experiment_id = self._call(self._open, tracking_uri, experiment)

    def _open(self, tracking_uri: str, experiment: str) -> str:
        self.mlflow.set_tracking_uri(tracking_uri)
        if self.mlflow.get_experiment_by_name(experiment) is None:
            self.mlflow.create_experiment(experiment, artifact_location(tracking_uri))
        return self.mlflow.set_experiment(experiment).experiment_id

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
    def _ending(self) -> Iterator[None]:
        """Ends the active run with the block: FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED."""
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._end(status)

    @contextmanager
    def parent(self, name: str, params: dict, config_file: Path | None,
               sweep: str = "") -> Iterator[str | None]:
        """The invocation's run; in a sweep, nested under the sweep's run."""
        run = None
        if self.enabled:
            parent = self._call(self._sweep_run, sweep)
            run = self._call(self.mlflow.start_run, run_name=name, parent_run_id=parent,
                             tags={"lancet.sweep": sweep} if sweep else None)
        if run is None:
            yield None
            return
        with self._ending():
            self._call(self.mlflow.log_params, flatten(params))
            if config_file is not None:
                self._call(self.mlflow.log_artifact, str(config_file))
            yield run.info.run_id

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
        run = None
        if self.enabled:
            run = self._call(self.mlflow.start_run, run_name=name, nested=True,
                             tags={"lancet.cached": str(cached).lower(),
                                   "lancet.fingerprint": fingerprint, "lancet.stage": name})
        if run is None:
            yield
            return
        with self._ending():
            yield

    def metrics(self, values: dict) -> None:
        clean = {k: float(v) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
        if clean and self.enabled:
            self._call(self.mlflow.log_metrics, clean)

    def curve(self, path: Path) -> None:
        """Per-step metrics (a JSON line per step, with ``step``) as MLflow metric histories."""
        if self.enabled and path.is_file():
            self._call(self._curve, path)

    def _curve(self, path: Path) -> None:
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
        return self._call(self._search, f"tags.`lancet.fingerprint` = {_quoted(fingerprint)} "
                          f"and tags.`lancet.stage` = {_quoted(stage)} and "
                          "tags.`lancet.artifacts` = 'logged'")

    def tag(self, key: str, value: str) -> None:
        self.tags({key: value})

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

    def model(self, path: Path, registered_name: str) -> None:
        """A Hugging Face causal-LM directory as an MLflow ``transformers`` model (a
        text-generation pipeline), registered as ``registered_name``. Raises when the folder
        is no such model (the caller logs its files instead); a store error disables the
        tracker like any other."""
        if not self.enabled or not path.is_dir():
            return
        from transformers import AutoModelForCausalLM, AutoTokenizer
        parts = {"model": AutoModelForCausalLM.from_pretrained(path),
                 "tokenizer": AutoTokenizer.from_pretrained(path)}
        # explicit requirements: inferring them imports every package the model might use
        self._call(self.mlflow.transformers.log_model,
                   transformers_model=parts, name=path.name, task="text-generation",
                   registered_model_name=registered_name,
                   pip_requirements=["torch", "transformers"])


def tracking_schemes() -> list[str]:
    """The URI schemes this MLflow has a tracking store for ("" is a local path); empty when
    its registry cannot be read (a private API, so any MLflow version still runs)."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry
        return sorted(_tracking_store_registry._registry)
    except Exception:  # noqa: BLE001 - only the message's detail depends on it
        return []


def store_cause(err: BaseException) -> str:
    """The innermost cause of a store error, one line (sqlite's words, not SQLAlchemy's SQL)."""
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    err = getattr(err, "orig", None) or err  # SQLAlchemy keeps the DB-API error in .orig
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return re.sub(r"^\(\S+\)\s*", "", text)
