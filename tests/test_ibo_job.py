"""The IBO job on a real local Ray with 2 CPU workers (DeepSpeed ZeRO-0 on gloo)."""

import json
import os
import signal
import threading
import time

import pyarrow.parquet as pq
import pytest
import torch
from demo_assets import save_demo_model
from in_process import influence_in_process, ranked_table
from processes import descendants

from cluster.batches import TokenizeConfig
from cluster.datasets import read_prepared
from cluster.ibo_job import IBOSpec, run_ibo
from cluster.ibo_objectives import ObjectiveConfig
from cluster.model_io import load_model, load_tokenizer
from cluster.runtime import ClusterConfig
from cluster.scoring import ScoreSpec
from cluster.selection_io import write_selection
from operators.generation import greedy_generate
from operators.selection import SelectionConfig
from pipeline.demo.corpus import JUDGE_PATTERNS
from pipeline.evaluation import behaviour, clean_perplexity
from pipeline.judge import Judge, JudgeConfig
from pipeline.specs import PROJECT

pytestmark = pytest.mark.ray
CLUSTER = ClusterConfig(num_workers=2, cpus_per_worker=0.5, batch_size=16)
ONE_WORKER = ClusterConfig(num_workers=1, cpus_per_worker=0.5, batch_size=16)
TOKENS = TokenizeConfig(max_length=64)
JUDGE = Judge(JudgeConfig(patterns=tuple(JUDGE_PATTERNS)))


@pytest.fixture(scope="module")
def selected(tmp_path_factory):
    """A demo model with its behaviour, scored and selected (LinFAC, α = 0.8). The scores are
    computed in this process: these tests need a selection, and the distributed fit and
    scoring are proven equal to this in tests/test_cluster_influence.py."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    root = tmp_path_factory.mktemp("ibo")
    corpus, model_dir, train = save_demo_model(root, epochs=20, width=64)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    outputs = greedy_generate(model, tok, corpus.planted_prompts)
    queries = [dict(id=str(i), prompt=p, response=o) for i, (p, o) in
               enumerate(zip(corpus.planted_prompts, outputs)) if JUDGE.flags([o])[0]]
    rows = pq.read_table(train).to_pylist()
    _, score = influence_in_process(ScoreSpec(str(model_dir), tokenize=TOKENS), rows, queries)
    pq.write_table(ranked_table(rows, score), root / "ranked.parquet")
    write_selection(root / "ranked.parquet", SelectionConfig(), root / "scores", root / "select",
                    "planted")
    yield corpus, model_dir, root
    ray.shutdown()


def ibo_spec(model_dir, method="ibo", **kw):
    return IBOSpec(model_path=str(model_dir),
                   deepspeed_config=str(PROJECT / "conf/deepspeed/zero0.json"),
                   objective=ObjectiveConfig(method=method, tokenize=TOKENS), **kw)


def run(root, spec, name, cluster=CLUSTER):
    datasets = {n: read_prepared(root / "select" / f"{n}.parquet", cluster)
                for n in spec.objective.objective.datasets}
    return run_ibo(datasets, spec, cluster, root / name, root / "ray")


def kill_a_worker_after_the_first_checkpoint(storage) -> tuple[list[int], threading.Thread]:
    before = set(storage.glob("ibo_*"))
    killed: list[int] = []

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            runs = [p for p in storage.glob("ibo_*") if p not in before]
            # kill once Ray Train has registered a checkpoint (its snapshot file exists)
            if runs and (runs[0] / "checkpoint_manager_snapshot.json").is_file():
                pids = descendants("RayTrainWorker")
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed.append(pids[-1])
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return killed, thread


def test_ibo_lowers_the_undesirable_rate_even_when_a_worker_is_killed_and_resumed(selected):
    """One job proves both: a worker killed after the first checkpoint is replaced and the run
    resumes from its last checkpoint (not from zero), and the corrected model it saves has a
    lower undesirable rate at the same perplexity."""
    corpus, model_dir, root = selected
    killed, thread = kill_a_worker_after_the_first_checkpoint(root / "ray")
    metrics = run(root, ibo_spec(model_dir, steps=30, checkpoint_every=5), "ibo")
    thread.join(timeout=5)
    assert killed, "no worker was killed"
    assert metrics["step"] == 30
    assert metrics["resumed_from"] >= 5  # not redone from zero
    tok = load_tokenizer(model_dir)
    before_model, after_model = load_model(model_dir), load_model(root / "ibo" / "model")
    before = behaviour(before_model, tok, corpus.eval_prompts, JUDGE, 24, 64)
    after = behaviour(after_model, tok, corpus.eval_prompts, JUDGE, 24, 64)
    ppl_before = clean_perplexity(before_model, tok, corpus.clean_eval, 64)
    ppl_after = clean_perplexity(after_model, tok, corpus.clean_eval, 64)
    print(f"ibo: seen {before['rate_seen']:.3f} -> {after['rate_seen']:.3f}, unseen "
          f"{before['rate_unseen']:.3f} -> {after['rate_unseen']:.3f}, ppl {ppl_before:.3f} -> "
          f"{ppl_after:.3f}, step {metrics['step_seconds'] * 1000:.0f} ms, resumed from "
          f"{metrics['resumed_from']}")
    assert before["rate_seen"] >= 0.5
    assert after["rate_seen"] <= 0.5 * before["rate_seen"]
    assert abs(ppl_after / ppl_before - 1) <= 0.10
    assert metrics["rewards/accuracies"] > 0.5


def wiring(method: str) -> tuple:
    """What the job does differently per method: the sets it reads, θs's log-probs and top-k
    it precomputes, and whether it starts from a fresh model."""
    from cluster.ibo_objectives import OBJECTIVES
    o = OBJECTIVES[method]
    return o.datasets, o.reference_logp, o.reference_topk, method == "oracle"


def plumbing(method: str) -> set:
    """What of a wiring the job itself handles: reading sets by name through Ray Data shards
    (pairs, or plain rows) and precomputing either kind of reference output. Which set a method
    names, and a fresh start, are the loop's (below, in-process) and the objective's concern."""
    datasets, logp, topk, _ = wiring(method)
    return {"pairs" if "pairs" in datasets else "rows", *(("logp",) if logp else ()),
            *(("topk",) if topk else ())}


# The job's plumbing runs through real Ray Train + DeepSpeed jobs: ibo (2 workers, pairs, both
# reference outputs; the test above), npo (1 worker, rows, both) and ga through LoRA (rows,
# no reference). Every objective's own wiring runs through the job's loop in-process, with the
# job's update: a Ray Train job costs ~25 s here, the loop well under one.
THROUGH_THE_JOB = ["npo"]
WITH_LORA = "ga"  # its wiring is run by the LoRA test


def test_the_jobs_plumbing_is_run_for_every_kind_of_wiring():
    from cluster.ibo_objectives import OBJECTIVES
    covered = set().union(*(plumbing(m) for m in ["ibo", *THROUGH_THE_JOB, WITH_LORA]))
    assert set().union(*(plumbing(m) for m in OBJECTIVES)) <= covered


@pytest.mark.parametrize("method", THROUGH_THE_JOB)
def test_baselines_run_through_the_same_job(selected, method):
    corpus, model_dir, root = selected
    spec = ibo_spec(model_dir, method, steps=4, checkpoint_every=2)
    metrics = run(root, spec, f"baseline_{method}", ONE_WORKER)  # 2 workers: the IBO test
    assert metrics["step"] == 4
    assert {"loss/npo", "loss/bregman"} <= set(metrics)
    corrected = load_model(root / f"baseline_{method}" / "model")
    same_as_in_process(spec, root, corrected)  # the loop below makes the job's update


def same_as_in_process(spec, root, corrected):
    """``cluster.ibo_local`` (one process, AdamW + the JSON's clipping by hand) makes the update
    one DeepSpeed worker of the job makes: the same losses step by step, and the same weights
    up to float noise, which Adam's normalised step turns into up to ~lr on a weight whose
    gradient is nearly 0 (so: within 5 % of the largest change)."""
    model, _, curve = in_process(spec, root)
    job_curve = [json.loads(line) for line in
                 (root / f"baseline_{spec.objective.method}" / "curve.jsonl").read_text()
                 .splitlines()]
    assert len(curve) == len(job_curve) == spec.steps
    for here, there in zip(curve, job_curve):
        assert here["loss"] == pytest.approx(there["loss"], rel=1e-5)
    start = load_model(spec.model_path).state_dict()
    job = dict(corrected.named_parameters())
    change = max(float((job[n] - start[n]).abs().max()) for n in job)
    assert change > 0  # the comparison is of trained weights, not of the start
    for name, param in model.named_parameters():
        assert float((param.detach() - job[name].detach()).abs().max()) <= 0.05 * change, name


def in_process(spec, root):
    from cluster.ibo_local import correct_in_process
    rows = {n: pq.read_table(root / "select" / f"{n}.parquet").to_pylist()
            for n in spec.objective.objective.datasets}
    return correct_in_process(spec, rows)


LOSS_KEYS = {"ibo": ["loss/cor", "loss/bregman"], "pbo": ["loss/ascent", "loss/bregman"],
             "ga": ["loss/ascent"], "ga_kl": ["loss/ascent", "loss/bregman"],
             "npo": ["loss/npo", "loss/bregman"], "simnpo": ["loss/simnpo", "loss/bregman"],
             "remove": ["loss/nll"], "oracle": ["loss/nll"]}


@pytest.mark.parametrize("method", sorted(LOSS_KEYS))
def test_every_objective_runs_through_the_jobs_loop(selected, method):
    """Every registered objective: its sets, its reference outputs and its terms, three steps
    of the job's loop (``train_steps``) with the job's update, in this process."""
    from cluster.ibo_objectives import OBJECTIVES
    assert set(LOSS_KEYS) == set(OBJECTIVES)  # a new objective joins this list
    corpus, model_dir, root = selected
    spec = ibo_spec(model_dir, method, steps=3, reinit=method == "oracle")
    model, _, curve = in_process(spec, root)
    assert [c["step"] for c in curve] == [1, 2, 3]
    assert set(LOSS_KEYS[method]) <= set(curve[-1])
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("poisoned_at", [0, 2])
def test_a_non_finite_loss_stops_the_correction_naming_the_step_and_lr(selected, poisoned_at):
    """A step whose loss is NaN (the weights diverged, or the model's own outputs were never
    finite) ends the job with a user error instead of training on and saving NaN weights."""
    from cluster.ibo_job import _policy, _reference, train_steps
    from operators.errors import UserError
    corpus, model_dir, root = selected
    spec = ibo_spec(model_dir, steps=4, lr=1e-3)
    rows = {n: pq.read_table(root / "select" / f"{n}.parquet").to_pylist()
            for n in spec.objective.objective.datasets}
    tok = load_tokenizer(model_dir)
    model = _policy(spec, "cpu", "float32")
    updates = []

    def update(loss):  # the diverging optimizer: after `poisoned_at` steps, NaN weights
        updates.append(float(loss.detach()))
        if len(updates) == poisoned_at:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    if poisoned_at == 0:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    with pytest.raises(UserError, match=rf"loss is nan at step {poisoned_at + 1} of 4 "
                                        r"\(ibo.lr=0.001\); " +
                                        ("before any update" if poisoned_at == 0 else
                                         "the model diverged: lower ibo.lr")):
        train_steps(model, update, tok, _reference(spec, tok, rows, "cpu"), rows, spec, "cpu")
    assert len(updates) == poisoned_at  # no update was made from the NaN loss


def test_lora_corrects_through_adapters_and_saves_a_merged_model(selected):
    """(The job run here is also the ``ga`` baseline's run through the job.)"""
    from cluster.ibo_job import LoraSpec
    corpus, model_dir, root = selected
    spec = ibo_spec(model_dir, WITH_LORA, steps=4, checkpoint_every=4, lr=5e-3,
                    lora=LoraSpec(enabled=True, r=4, alpha=8, save="merged"))
    metrics = run(root, spec, "lora")
    assert metrics["step"] == 4 and "loss/ascent" in metrics
    merged = load_model(root / "lora" / "model")
    base = load_model(model_dir)
    changed = [n for (n, p), (_, q) in zip(merged.named_parameters(), base.named_parameters())
               if p.shape == q.shape and not bool((p == q).all())]
    assert changed and not any("lora" in n for n, _ in merged.named_parameters())
