"""The DAG: a table of stages and the runner that caches, resumes and tracks them.

A stage's output is fingerprinted by the stage's name and version, its slice of the config and
its inputs' fingerprints, and lives in ``cache_dir/<stage>/<fingerprint>/``. A stage computes into
a temporary folder that is renamed into place only when it succeeded, so a killed run leaves no
half-written output and the rerun resumes at the first unfinished stage. ``output_dir/<name>``
links to each stage's cached output (names as CONTRACT.md section 3 fixes them). The stage
record (``records.py``) says what each file looked like; a cached stage whose files differ is
recomputed with a warning naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from operators.errors import UserError
from pipeline import records
from pipeline.artifacts import CATALOG
from pipeline.config import LancetConf
from pipeline.content import content_fingerprints
from pipeline.faults import write_fault
from pipeline.interrupt import as_interrupted
from pipeline.records import DONE

TMP = ".tmp-"  # a stage's temporary folder: .<fingerprint>.tmp-<host>-<pid>


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    inputs: tuple[str, ...]
    config_keys: tuple[str, ...]  # dotted paths of the config this stage depends on
    publish_as: str  # the name under output_dir
    artifacts: tuple[str, ...] = ()  # files/folders of the output logged to MLflow
    version: str = "1"
    # {config key: path} of the files the stage reads; their contents join the fingerprint
    reads: Callable[[LancetConf], dict[str, str]] | None = None
    curves: tuple[str, ...] = ()  # per-step metric files (JSON lines with ``step``) of the output
    model: str = ""  # a Hugging Face model folder of the output, logged as an MLflow model


@dataclass
class StageContext:
    """What a stage function sees: typed config, its inputs and its output (as catalog
    handles, ``pipeline/artifacts.py``), a log, and a work folder."""

    cfg: LancetConf
    inputs: dict[str, Path]
    out: Path
    log: Callable[[str], None]
    # Kept when the stage fails or is killed, removed once it succeeded: a stage that can
    # resume part-way (score, by shard) keeps its finished parts here.
    work: Path | None = None
    name: str = ""  # the stage's own name, which picks its output's handle

    def input(self, stage: str):
        """The handle of an upstream stage's published folder."""
        return CATALOG[stage](self.inputs[stage])

    def output(self):
        """The handle of this stage's folder (published atomically when the stage ends)."""
        return CATALOG[self.name](self.out)


def _pick(cfg: LancetConf, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


def fingerprint(stage: Stage, cfg: LancetConf, upstream: dict[str, str]) -> str:
    payload = {"stage": stage.name, "version": stage.version,
               "config": {k: _pick(cfg, k) for k in stage.config_keys},
               "inputs": {k: upstream[k] for k in stage.inputs}}
    if stage.reads is not None:  # an input edited in place must not reuse the old output
        payload["content"] = content_fingerprints(stage.reads(cfg), cfg.cache_dir)
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def order(stages: list[Stage]) -> list[Stage]:
    """Topological order of the table (inputs first), checking every input exists."""
    by_name = {s.name: s for s in stages}
    done: list[Stage] = []
    visiting: set[str] = set()

    def visit(stage: Stage) -> None:
        if stage in done:
            return
        if stage.name in visiting:
            raise ValueError(f"stage {stage.name} is part of a cycle")
        visiting.add(stage.name)
        for name in stage.inputs:
            if name not in by_name:
                raise ValueError(f"stage {stage.name} needs unknown stage {name}")
            visit(by_name[name])
        done.append(stage)

    for stage in stages:
        visit(stage)
    return done


def select_until(stages: list[Stage], until: str) -> list[Stage]:
    """The stages needed to produce ``until`` (all when empty)."""
    if not until:
        return stages
    names = [s.name for s in stages]
    if until not in names:
        raise UserError(f"pipeline.until={until!r}: expected one of {names}")
    by_name = {s.name: s for s in stages}
    needed: set[str] = set()
    todo = [until]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo.extend(by_name[name].inputs)
    return [s for s in stages if s.name in needed]


def _publish(final: Path, output_dir: Path, name: str) -> None:
    link = output_dir / name
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(final.resolve(), target_is_directory=True)


def run_stage(stage: Stage, cfg: LancetConf, inputs: dict[str, Path], fp: str, cache: Path,
              log: Callable[[str], None], verify: str = "quick") -> tuple[Path, dict, bool]:
    """Reuse the cached output of ``stage`` or compute it atomically; (path, metrics, cached)."""
    final = cache / stage.name / fp
    if (final / DONE).is_file():
        metrics = _reuse(stage, final, verify, log)
        if metrics is not None:
            return final, metrics, True
    return final, _compute(stage, cfg, inputs, final, log, verify), False


def _compute(stage: Stage, cfg: LancetConf, inputs: dict[str, Path], final: Path,
             log: Callable[[str], None], verify: str) -> dict:
    """Run ``stage`` in a temporary folder, record its files last, rename it to ``final``.

    ``<fingerprint>.partial`` is the stage's work folder: kept when the stage fails or is
    killed (scoring resumes from its shards), removed once the stage succeeded.
    """
    tmp = final.parent / f".{final.name}{TMP}{socket.gethostname()}-{os.getpid()}"
    work = final.parent / f"{final.name}.partial"
    began = time.perf_counter()
    try:
        _remove_orphans(final.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        metrics = stage.run(StageContext(cfg, inputs, tmp, log, work, stage.name)) or {}
        metrics[f"time/{stage.name}_s"] = time.perf_counter() - began
        records.write(tmp, {"stage": stage.name, "fingerprint": final.name, "metrics": metrics},
                      verify)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        fault = write_fault(err, final.parent) if isinstance(err, Exception) else None
        if fault is not None:  # a full or read-only disk: one line naming the path
            raise fault from err
        raise
    if final.exists():  # a concurrent job finished the same stage first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(final)
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def _remove_orphans(folder: Path) -> None:
    """Temporary stage folders that a killed run of this machine left (its process is gone);
    another machine's, sharing the cache, are never touched."""
    for tmp in folder.glob(f".*{TMP}{socket.gethostname()}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _reuse(stage: Stage, final: Path, verify: str, log: Callable[[str], None]) -> dict | None:
    """The metrics of a cached stage whose files match its record; None once a damaged one is
    moved aside (the caller recomputes it under the same fingerprint)."""
    record = records.load(final)
    damage = records.problem(final, record, verify)
    if not damage:
        return record["metrics"]
    why = f"cached stage {stage.name} is damaged ({damage})"
    records.discard(final, why)
    log(f"warning: {why}; recomputing it")
    return None


def to_compute(stages: list[Stage], cfg: LancetConf) -> list[str]:
    """The stages with no finished record in the cache, in order (what a run will compute,
    unless a recorded one proves damaged)."""
    prints: dict[str, str] = {}
    todo = []
    for stage in order(stages):
        prints[stage.name] = fingerprint(stage, cfg, prints)
        if not (Path(cfg.cache_dir) / stage.name / prints[stage.name] / DONE).is_file():
            todo.append(stage.name)
    return todo


def run_dag(stages: list[Stage], cfg: LancetConf, tracker, log: Callable[[str], None],
            first_publish: Callable[[], None] | None = None) -> dict[str, dict]:
    """Run ``stages`` in order; returns each stage's metrics (with ``cached``).
    ``first_publish`` runs once, before the first stage's output is linked under output_dir."""
    cache, output_dir = Path(cfg.cache_dir), Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    prints: dict[str, str] = {}
    results: dict[str, dict] = {}
    for stage in order(stages):
        fp = fingerprint(stage, cfg, prints)
        recorded = (cache / stage.name / fp / DONE).is_file()
        with tracker.stage(stage.name, recorded, fp), _names_stage(stage.name):
            log(f"stage {stage.name} [{fp}] ...")
            path, metrics, cached = run_stage(stage, cfg, {k: paths[k] for k in stage.inputs},
                                              fp, cache, log, cfg.pipeline.verify)
            if cached != recorded:  # found damaged and recomputed
                tracker.tags({"lancet.cached": str(cached).lower()})
            tracker.metrics(metrics)
            _log_outputs(tracker, stage, path, fp, log)
        paths[stage.name], prints[stage.name] = path, fp
        if first_publish is not None and not results:
            first_publish()
        _publish(path, output_dir, stage.publish_as)
        results[stage.name] = {**metrics, "cached": cached}
        log(f"stage {stage.name} reused from cache" if cached else
            f"stage {stage.name} done ({metrics.get(f'time/{stage.name}_s', 0):.1f} s)")
    return results


@contextmanager
def _names_stage(name: str) -> Iterator[None]:
    """An interrupt (Ctrl-C, SIGTERM) leaves the block as ``Interrupted`` naming the stage."""
    try:
        yield
    except KeyboardInterrupt as err:
        interrupted = as_interrupted(err)
        interrupted.stage = interrupted.stage or name
        if interrupted is err:
            raise
        raise interrupted from err


def _log_outputs(tracker, stage: Stage, path: Path, fp: str, log: Callable[[str], None]) -> None:
    """Curves every time; artifacts and the model once per fingerprint and experiment."""
    for rel in stage.curves:
        tracker.curve(path / rel)
    if not (stage.artifacts or stage.model):
        return
    first = tracker.logged_before(stage.name, fp)
    if first:  # reused from the cache: the artifacts are already in that run
        tracker.tag("lancet.artifacts_run", first)
        return
    for rel in stage.artifacts:
        tracker.artifacts(path / rel, stage.publish_as)
    if stage.model:
        try:
            tracker.model(path / stage.model, f"{tracker.experiment}-{stage.name}")
        except Exception as err:  # e.g. a LoRA adapter alone: keep its files instead
            log(f"stage {stage.name}: cannot log {stage.model} as an MLflow model ({err}); "
                "logging its files")
            tracker.artifacts(path / stage.model, f"{stage.publish_as}/{stage.model}")
    tracker.tag("lancet.artifacts", "logged")
