"""A two-node Ray cluster on one machine gives the same factors and scores as one worker.

The nodes are two test hosts (network namespaces joined by a veth pair, tests/netns.py): the
head runs ``ray start --head``, the second host ``ray start --address``, each with its own
CPUs; ``python -m pipeline`` runs on the head host against ``cluster.address``. Workers are
placed STRICT_SPREAD, so the all-reduce crosses the two hosts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from demo_assets import save_demo_model
from netns import IFNAME, two_hosts, unavailable
from pipeline_cli import ROOT, env, run_cli
from servers import stop_group

from cluster.factor_job import load_curvature

pytestmark = [pytest.mark.ray, pytest.mark.slow]
PORT = 6380
# Ray's multi-node mode (the default on Linux; the test suite turns it off for local Rays) and
# the interface gloo binds to (the hosts' names resolve to an address they do not have).
NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "GLOO_SOCKET_IFNAME": IFNAME}
# The head's checks of the other node: a node lost for good is declared dead after about 5 s,
# not Ray's 15-25 s (a check every 3 s, 10 s to answer, 5 missed)
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                 "RAY_health_check_failure_threshold": "3"}
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _start(host, *args: str, temp_dir: str, log) -> subprocess.Popen:
    argv = [*host.prefix(), RAY, "start", "--block", f"--node-ip-address={host.address}",
            "--num-cpus=2", "--object-store-memory=200000000", *args]
    return subprocess.Popen(argv, env=env(**NODE_ENV, **HEALTH_CHECKS), stdout=log,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=temp_dir)


def _alive_nodes(head, address: str) -> int:
    code = (f"import ray; ray.init(address={address!r}, log_to_driver=False); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    proc = subprocess.run([*head.prefix(), sys.executable, "-c", code], env=env(**NODE_ENV),
                          capture_output=True, text=True, timeout=60)
    return int(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else 0


@pytest.fixture(scope="module")
def two_node_cluster():
    reason = unavailable()
    if reason:
        pytest.skip(f"two test hosts need network namespaces: {reason}")
    temp_dir = tempfile.mkdtemp(prefix="lray", dir="/tmp")  # short: Ray's sockets live here
    with two_hosts() as (head, other), open(f"{temp_dir}/nodes.log", "w") as log:
        address = f"{head.address}:{PORT}"
        nodes = [_start(head, "--head", f"--port={PORT}", "--include-dashboard=false",
                        f"--temp-dir={temp_dir}", temp_dir=temp_dir, log=log)]
        try:
            time.sleep(5)
            nodes.append(_start(other, f"--address={address}", temp_dir=temp_dir, log=log))
            deadline = time.monotonic() + 120
            while _alive_nodes(head, address) < 2:
                if time.monotonic() > deadline:
                    log.flush()
                    raise AssertionError(f"the second node never joined:\n"
                                         f"{open(f'{temp_dir}/nodes.log').read()[-3000:]}")
                time.sleep(2)
            yield head, other, address, nodes
        finally:
            for proc in reversed(nodes):
                stop_group(proc)


@pytest.fixture(scope="module")
def byo_inputs(tmp_path_factory):
    """The demo model and corpus as a user's own: a model directory, train and query files."""
    root = tmp_path_factory.mktemp("byo")
    corpus, model_dir, train = save_demo_model(root)
    queries = root / "queries.jsonl"
    planted = [r for r in corpus.train if r["planted"]][:6]
    queries.write_text("".join(json.dumps({k: r[k] for k in ("id", "prompt", "response")}) + "\n"
                               for r in planted))
    return ["model=hf", f"model.path={model_dir}", "model.dtype=float64", "model.max_length=64",
            "data=custom", f"data.train={train}", f"data.queries={queries}",
            "data.label_column=planted", "influence.query_batch_size=2", "mlflow.enabled=false"]


def _actors(head, address: str) -> list[tuple[str, str, str]]:
    """(class name, host address, state) of every actor the GCS knows, finished ones too."""
    code = (f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
            "from ray._private.state import actors; "
            "print(json.dumps([[a['ActorClassName'], a['Address']['IPAddress'], a['State']] "
            "for a in actors().values()]))")
    proc = subprocess.run([*head.prefix(), sys.executable, "-c", code], env=env(**NODE_ENV),
                          capture_output=True, text=True, timeout=60, check=True)
    return [tuple(a) for a in json.loads(proc.stdout.strip().splitlines()[-1])]


def _actor_hosts(head, address: str) -> dict[str, set[str]]:
    """Class name -> addresses of the hosts its actors ran on."""
    out: dict[str, set[str]] = {}
    for name, ip, _ in _actors(head, address):
        out.setdefault(name, set()).add(ip)
    return out


def _results(out):
    factors = load_curvature(out / "factors")[0].to_tensors()
    scores = pq.read_table(out / "scores" / "scores.parquet").to_pandas().set_index("id")
    return factors, scores


def one_worker_reference(byo_inputs, cache) -> tuple[dict, dict]:
    """What one worker computes, here in this process without Ray, from the run's own prepared
    inputs and config: the factors (as saved) and each id's score."""
    from in_process import influence_in_process
    from test_configs import compose_typed

    from pipeline import specs
    from pipeline.artifacts import Prepared
    cfg = compose_typed(byo_inputs)
    prepared = Prepared(next(p for p in (cache / "prepare").iterdir()
                             if (p / "stage.json").is_file()))
    fit = specs.factor_spec(cfg, prepared.model_dir())
    train = pq.read_table(prepared.train).to_pylist()
    curvature, score = influence_in_process(
        specs.score_spec(cfg, prepared.model_dir()), train,
        pq.read_table(prepared.queries).to_pylist(), fit.fisher, fit.damping, hop=True)
    return curvature.to_tensors(), dict(zip((r["id"] for r in train), score.tolist()))


@pytest.fixture(scope="module")
def two_node_run(two_node_cluster, byo_inputs, tmp_path_factory):
    """The pipeline on both nodes, one worker per node, up to the selection."""
    head, other, address, _ = two_node_cluster
    root = tmp_path_factory.mktemp("two_nodes")
    run_cli(*byo_inputs, "pipeline.until=select", f"cache_dir={root / 'cache'}",
            f"output_dir={root / 'out'}", f"cluster.address={address}",
            "cluster.num_workers=2", "cluster.placement_strategy=STRICT_SPREAD",  # one per node
            prefix=head.prefix(), **NODE_ENV)
    return root


@pytest.fixture(scope="module")
def one_worker(byo_inputs, two_node_run):
    return one_worker_reference(byo_inputs, two_node_run / "cache")


def _assert_same_factors(factors, reference) -> None:
    """Equal, eigenvectors up to their sign (``eigh`` may flip a column when the sums it is
    given differ in the last bit, as sums added in another order do)."""
    assert sorted(factors) == sorted(reference)
    for name, ref in reference.items():
        got = factors[name]
        if name.endswith(("/qa", "/qs")):
            got = got * torch.sign((got * ref).sum(0, keepdim=True))
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-10, msg=name)


def test_two_node_cluster_fits_and_scores_like_one_worker(two_node_cluster, two_node_run,
                                                          one_worker):
    head, other, address, _ = two_node_cluster
    placed = _actor_hosts(head, address)
    both = {head.address, other.address}
    assert placed["RayTrainWorker"] == both, placed  # the all-reduce crossed the hosts
    assert placed["MapWorker(MapBatches(ShardScorer))"] == both, placed  # so did scoring
    factors, scores = _results(two_node_run / "out")
    factors1, scores1 = one_worker
    _assert_same_factors(factors, factors1)
    assert scores.index.is_unique and sorted(scores.index) == sorted(scores1)
    assert {"prompt", "response", "planted"} <= set(scores.columns)  # passthrough
    torch.testing.assert_close(torch.tensor(scores.loc[list(scores1), "score"].values),
                               torch.tensor(list(scores1.values()), dtype=torch.float64),
                               rtol=1e-6, atol=1e-9)


def _fitting(log: Path) -> bool:
    """The run's progress lines (``fit_factors: 12/568 sequences``) count sequences fitted: the
    worker group has started (a worker lost while it starts is a controller error that Ray Train
    does not retry, and a loaded machine may take any time to get there)."""
    counts = re.findall(r"fit_factors: (\d+)/", log.read_text()) if log.is_file() else []
    return any(int(n) > 0 for n in counts)


def test_losing_a_node_mid_fit_restarts_the_workers_and_the_factors_are_unchanged(
        two_node_cluster, byo_inputs, one_worker, tmp_path):
    """Runs last in this module: it takes the second node down for good."""
    head, other, address, nodes = two_node_cluster
    before = sum(name == "RayTrainWorker" for name, _, _ in _actors(head, address))
    argv = [*head.prefix(), sys.executable, "-m", "pipeline", *byo_inputs,
            "pipeline.until=fit_factors", f"cache_dir={tmp_path / 'cache'}",
            f"output_dir={tmp_path / 'out'}", f"cluster.address={address}",
            "cluster.num_workers=2", "cluster.placement_strategy=SPREAD",  # soft: may regroup
            "cluster.progress_every_s=0.2"]
    with open(tmp_path / "run.log", "w") as log:
        run = subprocess.Popen(argv, cwd=ROOT, env=env(**NODE_ENV), stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while (("RayTrainWorker", other.address, "ALIVE") not in _actors(head, address)
               and run.poll() is None):
            assert time.monotonic() < deadline, "no factor worker ever ran on the second node"
            time.sleep(0.5)
        while not _fitting(tmp_path / "run.log") and run.poll() is None:  # past group start
            assert time.monotonic() < deadline, "the fit never counted a sequence"
            time.sleep(0.1)
        os.killpg(nodes[1].pid, signal.SIGKILL)  # the node dies with its raylet and workers
        try:
            code = run.wait(timeout=300)
        finally:
            run.kill()
        assert code == 0, (tmp_path / "run.log").read_text()[-4000:]
    workers = sum(name == "RayTrainWorker" for name, _, _ in _actors(head, address)) - before
    assert workers > 2, "the worker group was never restarted"
    assert _alive_nodes(head, address) == 1
    _assert_same_factors(load_curvature(tmp_path / "out" / "factors")[0].to_tensors(),
                         one_worker[0])
