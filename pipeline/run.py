"""One pipeline invocation: typed config, MLflow parent run, the DAG, the closing summary."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import traceback
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import OmegaConf

from cluster.runtime import connect, unreachable
from cluster.tracking import Tracker, tracking_schemes
from cluster.user_errors import as_memory_error
from operators.errors import UserError
from pipeline import specs
from pipeline.config import LancetConf, to_typed
from pipeline.dag import run_dag, select_until, to_compute
from pipeline.faults import EXIT_CODE, write_fault
from pipeline.interrupt import as_interrupted, rearm_sigterm, sigterm_interrupts
from pipeline.interrupt import message as interrupt_message
from pipeline.locations import check_folder
from pipeline.records import CacheError
from pipeline.stages.table import CLUSTER_STAGES, STAGES
from pipeline.summary import summary
from pipeline.sweep_check import check_sweep

log = logging.getLogger("lancet")
USER_ERRORS = (UserError, FileNotFoundError)


# Overrides that say where, not what: left out of the parent run's name.
UNNAMED = ("output_dir", "cache_dir", "mlflow.", "cluster.", "hydra.", "pipeline.summary")
MAX_NAME = 120


class TrackingError(RuntimeError):
    """The MLflow store failed during a run whose stages finished."""


def tracking_uri(cfg: LancetConf, sweep: str = "") -> str:
    """The configured store, else SQLite under the sweep's folder (one store per sweep) or the
    run's output folder."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    return f"sqlite:///{Path(sweep or cfg.output_dir).resolve() / 'mlflow.db'}"


def run_name(overrides: list[str]) -> str:
    """The parent run's name: the overrides that change what is computed (``lancet`` if none)."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(UNNAMED)]
    name = " ".join(kept) or "lancet"
    return name if len(name) <= MAX_NAME else name[:MAX_NAME - 1] + "…"


def hydra_run() -> tuple[str, str]:
    """(run name from the overrides, the sweep's folder in a multirun else "")."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hydra = HydraConfig.get()
    sweep = str(Path(hydra.sweep.dir).resolve()) if hydra.mode == RunMode.MULTIRUN else ""
    return run_name(list(hydra.overrides.task)), sweep


def run_pipeline(cfg: LancetConf, resolved: dict, name: str = "lancet", sweep: str = "") -> dict:
    """Validate, then run the DAG (up to ``pipeline.until``) inside an MLflow parent run named
    ``name`` (nested under the sweep's run when ``sweep`` names a multirun's folder)."""
    specs.validate(cfg)
    stages = select_until(STAGES, cfg.pipeline.until)
    specs.check_inputs(cfg, corrects="ibo" in {s.name for s in stages})
    for key in ("output_dir", "cache_dir"):
        check_folder(key, Path(getattr(cfg, key)))
    if cfg.mlflow.enabled:
        _check_tracking_server(tracking_uri(cfg, sweep))
    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)  # an unwritable output fails before anything
    tracker = Tracker(tracking_uri(cfg, sweep), cfg.mlflow.experiment, cfg.mlflow.enabled)
    if tracker.failure is not None:  # a store that cannot even open fails before any stage
        raise TrackingError(_unopened(tracker.uri, tracker.failure))
    if set(to_compute(stages, cfg)) & set(CLUSTER_STAGES):  # a cached run starts no Ray
        connect(specs.cluster(cfg))  # fails at once if the workers can never be placed
        rearm_sigterm()
    log.info(f"output_dir: {output.resolve()}")
    log.info(f"cache_dir:  {Path(cfg.cache_dir).resolve()}")
    # The run's config.yaml joins output_dir with its first published stage: a run that fails
    # before it leaves a folder an earlier run published as that run left it.
    pending = output / ".pending"
    pending.mkdir(exist_ok=True)
    config_file = pending / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))

    def publish_config() -> None:
        shutil.copyfile(config_file, output / "config.yaml")

    try:
        with tracker.parent(name, resolved, config_file, sweep) as run_id:
            results = run_dag(stages, cfg, tracker, log.info, publish_config)
            final = {k: v for stage in results.values() for k, v in stage.items()
                     if k != "cached" and ("/" in k)}
            tracker.metrics(final)
    finally:
        shutil.rmtree(pending, ignore_errors=True)
    (output / "run.json").write_text(json.dumps(
        {"mlflow_run_id": run_id, "tracking_uri": tracker.uri, "stages": results}, indent=2,
        default=str))
    if tracker.failure is not None:
        raise TrackingError(f"the MLflow tracking store {tracker.uri} failed: {tracker.failure}; "
                            f"stage results are kept in {Path(cfg.cache_dir).resolve()}")
    return {"results": results, "run_id": run_id, "tracking_uri": tracker.uri}


def _check_tracking_server(uri: str, timeout_s: float = 10.0) -> None:
    """An MLflow server where nothing answers fails the run at start: MLflow's client retries
    each request with back-off (a run sat 4 minutes before its first stage), then every stage
    ran unlogged."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    why = unreachable(parsed.hostname, port, timeout_s)
    if why:
        raise TrackingError(f"the MLflow tracking store {uri} does not answer ({why}); start "
                            "it, or set mlflow.tracking_uri (empty: a local store) or "
                            "mlflow.enabled=false")


def _unopened(uri: str, failure: str) -> str:
    """Why the store at ``uri`` did not open, naming the key (an unknown scheme: MLflow says
    only the scheme's name)."""
    scheme = urlparse(uri).scheme
    known = tracking_schemes()
    why = (f"MLflow has no tracking store for the scheme {scheme!r} (it knows "
           f"{', '.join(s for s in known if s)})" if known and scheme not in known else failure)
    return (f"the MLflow tracking store {uri} cannot be opened ({why}); fix mlflow.tracking_uri "
            "(empty: a local store) or set mlflow.enabled=false")


def run_from_hydra(cfg) -> int:
    """Entry used by ``python -m pipeline``; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="[lancet] %(message)s", force=True)
    typed = None
    try:
        check_sweep()  # a multirun's first job checks every job before any runs
        typed = to_typed(cfg)
        resolved = asdict(typed)  # what the run uses: demo-only defaults already resolved
        with sigterm_interrupts():
            out = run_pipeline(typed, resolved, *hydra_run())
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM from `ray job stop`
        stop = as_interrupted(err)
        cache = Path(typed.cache_dir if typed is not None else cfg.cache_dir).resolve()
        print(f"error: {interrupt_message(stop, str(cache))}", file=sys.stderr)
        return stop.exit_code
    except (CacheError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CODE
    except Exception as err:  # a stage failed: the cause, then the trace for a bug report
        return _report(err)
    if typed.pipeline.summary:
        print(summary(typed, out))
    return 0


def _report(err: Exception) -> int:
    """One line for a machine fault (exit 3) or bad input (exit 2); else the trace (exit 1)."""
    fault = write_fault(err)  # before user errors: a full disk is an OSError, not bad input
    if fault is not None:
        print(f"error: {fault}", file=sys.stderr)
        return EXIT_CODE
    cause = as_memory_error(err) or _user_cause(err)
    if cause is not None:
        print(f"error: {cause}", file=sys.stderr)
        return 2
    traceback.print_exc()
    return 1


def _user_cause(err: BaseException) -> BaseException | None:
    """A user error raised inside a Ray worker arrives wrapped; find it in the chain, or (when
    Ray Train passed on only its text) by the name of its class in the message."""
    seen = err
    while seen is not None:
        if isinstance(seen, USER_ERRORS):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    for kind in _user_error_names():
        if f"{kind}: " in text:
            line = next((ln for ln in text.splitlines() if f"{kind}: " in ln), text)
            return UserError(line.split(f"{kind}: ", 1)[-1])
    return None


def _user_error_names() -> list[str]:
    """``UserError`` and every subclass of it, most derived first."""
    found, todo = [], [UserError]
    while todo:
        kind = todo.pop()
        found.insert(0, kind.__name__)
        todo.extend(kind.__subclasses__())
    return found
