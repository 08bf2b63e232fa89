"""The MLflow adapter when its store fails: the first error kept, the run's results untouched."""

from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from cluster.tracking import Tracker, store_cause
from pipeline.dag import Stage, run_dag


class OperationalError(Exception):
    """Stands for sqlite3.OperationalError."""


class StoreError(Exception):
    """Stands for SQLAlchemy's wrapper: the DB-API error in ``.orig``, SQL in the text."""

    def __init__(self, orig):
        super().__init__(f"(sqlite3.OperationalError) {orig}\n[SQL: INSERT INTO metrics ...]")
        self.orig = orig


class FullStore:
    """An ``mlflow`` module whose store is full from the first metric on."""

    def __init__(self):
        self.calls, self.ended = [], []

    def start_run(self, **kw):
        self.calls.append("start_run")
        return SimpleNamespace(info=SimpleNamespace(run_id="r1"))

    def log_params(self, params):
        self.calls.append("log_params")

    def log_metrics(self, values):
        self.calls.append("log_metrics")
        try:
            raise OperationalError("database or disk is full")
        except OperationalError as err:
            raise StoreError(err) from err

    def end_run(self, status):
        self.ended.append(status)
        raise StoreError(OperationalError("database or disk is full"))


def tracker(store) -> Tracker:
    out = Tracker("sqlite:///full.db", "lancet", enabled=False)
    out.enabled, out.mlflow = True, store
    return out


def test_the_first_store_error_is_kept_and_logging_stops():
    store = FullStore()
    t = tracker(store)
    with t.parent("lancet", {"a": 1}, None) as run_id:
        with t.stage("prepare", False, "fp"):
            t.metrics({"x": 1.0})
            t.metrics({"y": 2.0})
    assert run_id == "r1" and t.failure == "database or disk is full" and not t.enabled
    assert store.calls.count("log_metrics") == 1
    assert store.ended == ["FINISHED", "FINISHED"]  # runs ended even after the failure


def test_a_stage_error_is_not_replaced_by_the_store_failing_to_end_the_run():
    t = tracker(FullStore())
    with pytest.raises(KeyError, match="the stage's own"):
        with t.parent("lancet", {}, None), t.stage("prepare", False, "fp"):
            raise KeyError("the stage's own")


def test_store_cause_is_sqlites_words_not_the_sql():
    assert store_cause(StoreError(OperationalError("database or disk is full"))) == \
        "database or disk is full"


class Recorder:
    def __init__(self):
        self.tagged = []

    @contextmanager
    def stage(self, name, cached, fingerprint):
        yield

    def metrics(self, values):
        pass

    def tags(self, values):
        self.tagged.append(values)


def test_a_stage_recomputed_from_a_damaged_cache_is_tagged_as_computed(tmp_path):
    def write(ctx):
        ctx.out.joinpath("a.bin").write_bytes(b"a" * 10)

    cfg = SimpleNamespace(cache_dir=str(tmp_path / "c"), output_dir=str(tmp_path / "o"),
                          pipeline=SimpleNamespace(verify="quick"))
    stages = [Stage("s", write, (), (), "s")]
    run_dag(stages, cfg, Recorder(), print)
    next((tmp_path / "c" / "s").glob("*/a.bin")).write_bytes(b"a")
    recorder = Recorder()
    assert run_dag(stages, cfg, recorder, print)["s"]["cached"] is False
    assert recorder.tagged == [{"lancet.cached": "false"}]


def test_the_summary_points_at_the_mlflow_run_or_says_none_was_logged():
    from test_configs import compose_typed

    from pipeline.summary import summary
    results = {"results": {}, "tracking_uri": "sqlite:///x/mlflow.db"}
    logged = summary(compose_typed([]), {**results, "run_id": "abc"})
    assert "MLflow runs:         sqlite:///x/mlflow.db (run abc)" in logged
    assert "mlflow ui --backend-store-uri sqlite:///x/mlflow.db" in logged
    off = summary(compose_typed(["mlflow.enabled=false"]), {**results, "run_id": None})
    assert "MLflow:              off (mlflow.enabled=false)" in off and "run None" not in off
