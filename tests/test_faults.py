"""Faults on a real local Ray: killed workers, killed scorers, a killed driver, failed writes,
a damaged cache, a full or read-only disk."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from demo_assets import save_demo_model
from pipeline_cli import DEMO, ROOT, computed, copy_cache, env, run_cli
from processes import descendants, kill_session

from cluster.batches import TokenizeConfig
from cluster.dataio import write_parquet_atomic
from cluster.datasets import read_prepared
from cluster.factor_job import FactorSpec, fit_factors, load_curvature
from cluster.runtime import ClusterConfig
from cluster.scoring import ScoreSpec, finalize, precondition, score_corpus
from pipeline import records

pytestmark = pytest.mark.ray
CLUSTER = ClusterConfig(num_workers=2, cpus_per_worker=0.5, batch_size=4)
COPIES = 2  # the corpus twice over: a fit and a scoring long enough to be killed mid-way
TOKENS = TokenizeConfig(max_length=64)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = tmp_path_factory.mktemp("faults")
    corpus, model_dir, train = save_demo_model(root, epochs=6, width=32)
    big = [{**r, "id": f"{r['id']}-{k}"} for k in range(COPIES) for r in corpus.train]
    write_parquet_atomic(big, root / "big.parquet")
    yield corpus, model_dir, root
    ray.shutdown()


def kill_when(title: str, ready=lambda: True, delay: float = 0.5, timeout: float = 240):
    """Start a thread that SIGKILLs the newest process whose title contains ``title``."""
    killed: list[int] = []

    def run():
        deadline = time.time() + timeout
        while time.time() < deadline:
            pids = descendants(title)
            if pids and ready():
                time.sleep(delay)
                pids = descendants(title)
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return killed, thread


def fit(assets, out, progress=None):
    corpus, model_dir, root = assets
    spec = FactorSpec(str(model_dir), dtype="float64", tokenize=TOKENS)
    fit_factors(read_prepared(root / "big.parquet", CLUSTER), spec, CLUSTER, out, root / "ray",
                progress=progress)
    return load_curvature(out)[0]


def undisturbed(assets):
    """The same fit in this process, no Ray: per-sample seeds make it the reference."""
    from cluster.batches import iter_row_batches, to_tensors
    from cluster.model_io import load_model, load_tokenizer
    from operators.curvature import DEFAULT_LOGODDS_CAP, fit_curvature
    from operators.units import discover_units
    corpus, model_dir, root = assets
    rows = pq.read_table(root / "big.parquet").to_pylist()
    model, tok = load_model(model_dir, "float64"), load_tokenizer(model_dir)
    batches = [to_tensors(c, tok, TOKENS) for c in iter_row_batches(rows, 32)]
    return fit_curvature(model, discover_units(model, "linfac"), batches,
                         logodds_cap=DEFAULT_LOGODDS_CAP)  # FactorSpec's


def fitting_started(lines: list[str]) -> bool:
    """A progress line counts sequences already fitted (``fit_factors: 12/2272 …``)."""
    return any(int(line.split(": ", 1)[1].split("/")[0]) > 0 for line in lines)


@pytest.fixture(scope="module")
def killed_fit(assets):
    """A factor fit whose worker is killed once it is fitting (not while the group starts: a
    worker lost at start-up is a controller error that Ray Train does not retry)."""
    from cluster.progress import Progress
    rows, lines = COPIES * len(assets[0].train), []
    with Progress("fit_factors", 2 * rows, lines.append, every_s=0.0, poll_s=0.05,
                  tty=False) as progress:
        killed, thread = kill_when("RayTrainWorker", ready=lambda: fitting_started(lines),
                                   delay=0.2)
        curvature = fit(assets, assets[2] / "factors", progress.counter)
    thread.join(timeout=5)
    return killed, curvature


def test_a_worker_killed_during_factor_fitting_is_retried_to_the_same_factors(assets,
                                                                              killed_fit):
    killed, disturbed = killed_fit
    calm = undisturbed(assets)
    assert killed, "no factor worker was killed"
    for name in calm.eigens:
        torch.testing.assert_close(disturbed.lambdas[name], calm.lambdas[name], rtol=1e-6,
                                   atol=1e-12)


def test_a_scoring_actor_killed_mid_stream_still_scores_every_id_once(assets, killed_fit):
    corpus, model_dir, root = assets
    spec = ScoreSpec(str(model_dir), tokenize=TOKENS)
    queries = [r for r in corpus.train if r["planted"]][:4]
    features = precondition(spec, queries, root / "factors")  # the killed fit's factors
    raw = root / "raw"
    killed, thread = kill_when("MapBatches(Scorer)",
                               ready=lambda: raw.exists() and any(raw.glob("*.parquet")),
                               delay=0.0)
    score_corpus(read_prepared(root / "big.parquet", CLUSTER), spec, features, CLUSTER, raw)
    thread.join(timeout=5)
    finalize(raw, root / "ranked", "max")
    assert killed, "no scoring actor was killed"
    ids = pq.read_table(root / "ranked", columns=["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == COPIES * len(corpus.train)


def test_a_failed_write_leaves_nothing_under_the_final_name(tmp_path, monkeypatch):
    import pyarrow.parquet as pq_module
    target = tmp_path / "out.parquet"

    def broken(table, where, **kw):
        open(where, "wb").write(b"PAR1 half")
        raise OSError("disk full")

    monkeypatch.setattr(pq_module, "write_table", broken)
    with pytest.raises(OSError):
        write_parquet_atomic([{"id": "a"}], target)
    assert not target.exists()


def test_a_stage_that_fails_half_way_leaves_no_output(tmp_path):
    from pipeline.dag import Stage, run_stage

    def half(ctx):
        (ctx.out / "part.bin").write_bytes(b"x" * 10)
        raise RuntimeError("killed half-way")

    stage = Stage("half", half, (), (), "half")
    with pytest.raises(RuntimeError):
        run_stage(stage, None, {}, "fp", tmp_path, print)
    assert list((tmp_path / "half").iterdir()) == []


def test_a_killed_runs_temporary_stage_folder_is_removed_by_the_next_run(tmp_path):
    """(A driver killed during a stage left its empty .<fp>.tmp-<pid> folder for good.) Only
    this machine's folders whose process is gone: a live run's, or another machine's sharing
    the cache, are kept."""
    import socket

    from pipeline.dag import Stage, run_stage
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    left = {name: tmp_path / "s" / f".{name}.tmp-{who}" for name, who in [
        ("killed", f"{host}-{gone}"), ("live", f"{host}-{os.getppid()}"),
        ("other", f"elsewhere-{gone}")]}
    for folder in left.values():
        folder.mkdir(parents=True)
    stage = Stage("s", lambda ctx: (ctx.out / "f").write_text("x") and {}, (), (), "s")
    run_stage(stage, None, {}, "fp", tmp_path, print)
    assert not left["killed"].exists() and left["live"].is_dir() and left["other"].is_dir()
    assert (tmp_path / "s" / "fp" / "f").read_text() == "x"


@contextmanager
def small_disk(where: Path, size: str, *options: str):
    """A tmpfs of ``size`` mounted at ``where`` (root only), or a skip saying why not."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("a small filesystem needs root to mount a tmpfs")
    opts = ",".join((f"size={size}", *options))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def one_error_line(proc) -> str:
    """The run ended with exit 3 and one ``error:`` line, no traceback; that line."""
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]
    return errors[0]


def intact(cache: Path) -> None:
    """No temporary folder left, and every published stage matches its record."""
    assert not [p for p in cache.rglob(".*tmp-*")], "a temporary stage folder was left"
    for done in cache.glob("*/*/stage.json"):
        assert records.problem(done.parent, records.load(done.parent), "full") == ""


@pytest.mark.slow
def test_a_truncated_cached_artifact_is_recomputed_with_a_warning(tmp_path, demo_run):
    """The first stage's model weights are cut in half: the damage is found before they are
    used, and that stage alone is computed again (every stage's record is checked alike)."""
    from cluster.model_io import load_model
    cache, out = copy_cache(demo_run[0], tmp_path / "cache"), tmp_path / "out"
    weights = next(cache.glob("prepare/*/model/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = run_cli(*DEMO, "pipeline.until=prepare",
                   f"cache_dir={cache}", f"output_dir={out}")
    assert f"cached stage prepare is damaged ({weights}: " in proc.stderr
    assert computed(out) == {"prepare"}
    load_model(weights.parent)
    intact(cache)


@pytest.mark.slow
def test_a_full_disk_under_cache_and_output_ends_with_one_line(tmp_path):
    with small_disk(tmp_path / "small", "1m") as disk:
        proc = run_cli(*DEMO, f"cache_dir={disk / 'cache'}",
                       f"output_dir={disk / 'out'}", check=False)
        line = one_error_line(proc)
        assert str(disk) in line
        assert "no space left on device" in line or "database or disk is full" in line
        intact(disk / "cache")


@pytest.mark.slow
def test_a_full_mlflow_store_keeps_the_stage_results(tmp_path, demo_run):
    cache, out = copy_cache(demo_run[0], tmp_path / "cache"), tmp_path / "out"
    # The store opens (a store that cannot open refuses the run before any stage) and fills on
    # the run's first write: made elsewhere, with the experiment, then copied onto a disk of
    # exactly its size.
    from cluster.tracking import Tracker
    made = tmp_path / "made" / "mlflow.db"
    made.parent.mkdir()
    assert Tracker(f"sqlite:///{made}", "lancet").failure is None
    pages = -(-made.stat().st_size // 4096)
    with small_disk(tmp_path / "small", f"{pages * 4}k") as disk:
        shutil.copyfile(made, disk / "mlflow.db")
        proc = run_cli(*DEMO, "pipeline.until=select",
                       "influence.alpha=0.65", f"cache_dir={cache}", f"output_dir={out}",
                       f"mlflow.tracking_uri=sqlite:///{disk / 'mlflow.db'}", check=False)
    line = one_error_line(proc)
    assert line == (f"error: the MLflow tracking store sqlite:///{disk / 'mlflow.db'} failed: "
                    f"database or disk is full; stage results are kept in {cache.resolve()}")
    assert computed(out) == {"select"}
    assert (out / "scores" / "scores.parquet").is_file()
    intact(cache)


@pytest.mark.slow
def test_a_read_only_output_dir_ends_with_one_line_before_any_stage(tmp_path):
    with small_disk(tmp_path / "ro", "64k", "ro") as disk:
        proc = run_cli(*DEMO, f"cache_dir={tmp_path / 'cache'}",
                       f"output_dir={disk / 'out'}", check=False)
    assert one_error_line(proc) == f"error: cannot write {disk / 'out'}: read-only file system"
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_a_killed_driver_reruns_skipping_finished_stages_and_resumes_scoring_by_shard(
        tmp_path, demo_run):
    """The driver (and the local Ray it started) is killed mid-scoring, in the second hop's
    pass. The rerun reuses the stage the killed run finished, every shard of the first pass and
    those the second had scored, scores only the rest, and equals the shared uninterrupted run
    (same ids, same scores)."""
    from pipeline_cli import stages
    cache = copy_cache(demo_run[0], tmp_path / "cache")
    shutil.rmtree(cache / "prepare")  # computed again by the run that is killed
    shutil.rmtree(cache / "score")  # scored again, by shards of 16 rows
    score = (*DEMO, "cluster.score_shard_rows=16",
             "pipeline.until=score", "mlflow.enabled=false")
    args = [sys.executable, "-m", "pipeline", *score, f"cache_dir={cache}",
            f"output_dir={tmp_path / 'killed'}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    hop = "score/*.partial/hop/raw/*.parquet"  # the second pass's shards
    while time.time() < deadline and len(list(cache.glob(hop))) < 3:
        time.sleep(0.1)
    kill_session(proc.pid)  # the driver, the local Ray it started and that Ray's workers
    proc.wait(timeout=60)
    assert list(cache.glob("prepare/*/stage.json")), "the killed run never finished prepare"
    kept = list(cache.glob(hop))
    total = -(-len(pq.read_table(cache.glob("prepare/*/train.parquet").__next__())) // 16)
    assert len(list(cache.glob("score/*.partial/raw/*.parquet"))) == total
    assert 3 <= len(kept) < total, f"{len(kept)} of {total} second-pass shards when killed"
    run_cli(*score, f"cache_dir={cache}", f"output_dir={tmp_path / 'resumed'}")
    assert computed(tmp_path / "resumed") == {"score"}  # prepare (and fit_factors): reused
    resumed = stages(tmp_path / "resumed")["score"]
    assert resumed["score/shards_reused"] == total and resumed["score/shards_scored"] == 0
    assert resumed["score/second_hop_shards_reused"] == len(kept)
    assert resumed["score/second_hop_shards_scored"] == total - len(kept)
    print(f"resume by shard: {len(kept)} of {total} second-pass shards reused, "
          f"{resumed['score/second_hop_shards_scored']} scored")
    assert not list(cache.glob("score/*.partial")), "the work folder outlived the stage"

    def scores(out):
        table = pq.read_table(out / "influence" / "ranked", columns=["id", "score"])
        return dict(zip(*(table.column(c).to_pylist() for c in ("id", "score"))))
    got, calm = scores(tmp_path / "resumed"), scores(demo_run[1])
    assert sorted(got) == sorted(calm)  # every id once
    torch.testing.assert_close(torch.tensor([got[i] for i in calm]),
                               torch.tensor(list(calm.values())), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "ray-job-stop"])
def test_an_interrupted_run_ends_with_one_line_and_its_runs_killed(tmp_path, demo_run, sig):
    """Ctrl-C (Ray Train's handler used to end the driver with exit 1 and no word) and SIGTERM,
    what `ray job stop` sends (Ray's own handler aborted the driver, exit 134, `.pending` and
    RUNNING MLflow runs left behind), during the factor fit: exit 128 + the signal, one line
    naming the stage, the MLflow runs KILLED, nothing half-written."""
    import sqlite3
    cache = copy_cache(demo_run[0], tmp_path / "cache", stages=("prepare",))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "pipeline", *DEMO, "pipeline.until=fit_factors",
            f"cache_dir={cache}", f"output_dir={out}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    lines: list[str] = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if "stage fit_factors [" in line:
                break
        time.sleep(3)  # inside Ray Train's fit
        os.kill(proc.pid, sig)
        lines += proc.stderr.readlines()
        proc.wait(timeout=120)
    finally:
        kill_session(proc.pid)
    text = "".join(lines)
    assert proc.returncode == 128 + sig, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert text.rstrip().splitlines()[-1] == (
        f"error: interrupted by {signal.Signals(sig).name} during stage fit_factors: finished "
        f"stages (and finished score shards) are kept in {cache}; run the same command again "
        "to resume")
    db = sqlite3.connect(out / "mlflow.db")
    status = dict(db.execute("select name, status from runs").fetchall())
    assert status.pop("fit_factors") == "KILLED" and status.pop("prepare") == "FINISHED"
    assert list(status.values()) == ["KILLED"]  # the invocation's parent run
    assert not (out / ".pending").exists()
    intact(cache)
    assert not list(cache.glob("fit_factors/*/stage.json"))
