"""The pipeline as a user runs it: outputs, caching, reruns, sweeps (real Hydra, Ray, MLflow)."""

import json
import re

import pyarrow.parquet as pq
import pytest
from pipeline_cli import DEMO, computed, copy_cache, run_cli, stages

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY_STARTED = "Started a local Ray instance"
ALL = {"prepare", "fit_factors", "score", "select", "ibo", "evaluate", "report"}


@pytest.fixture(scope="module")
def cache(demo_run):
    return demo_run[0]


@pytest.fixture(scope="module")
def first_run(demo_run):
    return demo_run[1], demo_run[2]


def test_the_demo_finds_the_planted_data_and_halves_the_rate_at_the_same_perplexity(first_run):
    """`make demo`'s run, end to end: recall, correction and the summary a user reads."""
    out, proc = first_run
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    print({k: round(v, 3) for k, v in metrics.items()})
    assert metrics["detect/auprc"] >= 0.9
    for key in ("behavior/undesirable_rate", "behavior/undesirable_rate_unseen"):
        assert metrics[f"{key}_before"] > 0
        assert metrics[f"{key}_after"] <= 0.5 * metrics[f"{key}_before"]
    assert metrics["utility/ppl_after"] <= 1.1 * metrics["utility/ppl_before"]
    # the label-free look at the sets: the demo's drivers say the harmful thing themselves
    assert metrics["detect/positive_judged_share"] >= 0.9
    assert metrics["detect/negative_judged_share"] <= 0.1
    assert "recall AUPRC" in proc.stdout and "undesirable, unseen" in proc.stdout
    assert "judge on the sets:" in proc.stdout


def test_outputs_follow_the_contract(first_run):
    out, proc = first_run
    assert computed(out) == ALL
    assert "LANCET summary" in proc.stdout and "mlflow ui" in proc.stdout
    assert (out / "factors" / "factors.safetensors").is_file()
    meta = json.loads((out / "factors" / "meta.json").read_text())
    assert {"model_fingerprint", "data_fingerprint", "units", "counts", "dtypes"} <= set(meta)
    scores = pq.read_table(out / "scores" / "scores.parquet")
    assert scores.column_names[:4] == ["id", "score", "rank", "set"]
    assert {"prompt", "response", "planted"} <= set(scores.column_names)
    assert set(scores.column("set").to_pylist()) <= {"positive", "negative", "neutral"}
    ids = scores.column("id").to_pylist()
    assert len(ids) == len(set(ids))
    from cluster.attribution import units_of  # the top 100 rows' per-sublayer shares
    assert units_of(scores.schema) == [f"transformer.h.{i}.{p}" for i in (0, 1)
                                       for p in ("attn", "mlp")]
    shares = scores.column("unit_shares").to_pylist()[:100]  # in rank order
    assert None not in shares and scores.column("unit_shares").null_count == len(ids) - 100
    assert all(abs(sum(s) - 1) < 1e-4 for s in shares)
    # ... and their dependence on each sublayer, as percentiles among 256 other rows
    assert units_of(scores.schema, "unit_dependence") == units_of(scores.schema)
    dependence = scores.column("unit_dependence").to_pylist()[:100]
    assert scores.column("unit_dependence").null_count == len(ids) - 100
    assert all(len(d) == 4 and all(0 <= v <= 1 for v in d) for d in dependence)
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "ibo" / "model")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    for key in ("detect/auprc", "detect/recall_at_k", "behavior/undesirable_rate_before",
                "behavior/undesirable_rate_after", "behavior/undesirable_rate_unseen_before",
                "behavior/undesirable_rate_unseen_after", "utility/ppl_before",
                "utility/ppl_after", "utility/distinct2_before", "utility/distinct2_after",
                "behavior/overrefusal_rate_before", "behavior/overrefusal_rate_after",
                "utility/distinct2_clean_before", "utility/distinct2_clean_after",
                "robustness/relearn_10_undesirable_rate", "robustness/relearn_50_undesirable_rate",
                "detect/positive_judged_share", "detect/negative_judged_share"):
        assert key in metrics, key
    for png in ("score_distribution.png", "precision_recall.png", "undesirable_rate.png",
                "relearning.png", "layer_attribution.png"):
        assert (out / "report" / png).stat().st_size > 1000
    top = (out / "report" / "top_influential.md").read_text()
    assert "| rank |" in top and "| judged |" in top
    first = next(line for line in top.splitlines() if line.startswith("| 1 |"))
    assert "| yes |" in first  # the demo's top driver says the harmful thing itself
    assert (out / "report" / "layer_attribution.csv").read_text().startswith(
        "layer,attn,mlp,attn_reliance,mlp_reliance\n")
    # every query in parts: its whole response, the demo judge's match, its opening tokens
    found = re.search(r"score: (\d+) queries in (\d+) query batches \(influence.query_parts="
                      r"\['response', 'judged', 'opening'\]", proc.stderr)  # the run's log
    assert found and int(found[1]) < int(found[2]) <= 3 * int(found[1]), proc.stderr[-3000:]


def test_rerun_recomputes_nothing_and_alpha_recomputes_from_select(first_run, cache, tmp_path):
    """A rerun computes nothing; a new α computes select (and, without ``pipeline.until``,
    what follows it), reuses what comes before, and MLflow tags each stage run so."""
    from mlflow.tracking import MlflowClient
    same = run_cli(*DEMO, f"cache_dir={cache}", f"output_dir={tmp_path / 'same'}")
    assert computed(tmp_path / "same") == set()
    assert RAY_STARTED in first_run[1].stderr and RAY_STARTED not in same.stderr  # no need
    run_cli(*DEMO, f"cache_dir={cache}", f"output_dir={tmp_path / 'alpha'}",
            "influence.alpha=0.5", "pipeline.until=select")
    assert computed(tmp_path / "alpha") == {"select"}
    run = json.loads((tmp_path / "alpha" / "run.json").read_text())
    client = MlflowClient(tracking_uri=run["tracking_uri"])
    parent = client.get_run(run["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {r.info.run_name: r.data.tags["lancet.cached"] for r in children} == {
        "prepare": "true", "fit_factors": "true", "score": "true", "select": "false"}


def test_a_sweep_over_alpha_and_batch_size_reuses_the_factors_and_scores_once_per_batch_size(
        cache, tmp_path):
    """A cache holding the demo's prepared data and factors (a fresh fit costs a Ray Train
    job, about 35 s here): the four jobs fit nothing, since the factors' key holds neither α
    nor the batch size, and score once per batch size. ``output_dir`` names the sweep's
    folder: job n writes its n-th subfolder."""
    from mlflow.tracking import MlflowClient
    sweep = tmp_path / "sweep"
    fresh = copy_cache(cache, tmp_path / "cache", stages=("prepare", "fit_factors"))
    run_cli("-m", *DEMO, "pipeline.until=select", "influence.alpha=0.5,0.9",
            "influence.query_batch_size=1,8", f"cache_dir={fresh}", f"output_dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if (p / "run.json").is_file())
    assert len(jobs) == 4
    assert not [j for j in jobs if "fit_factors" in computed(j)]
    scores = [j for j in jobs if "score" in computed(j)]
    assert len(scores) == 2  # one scoring per batch size
    assert all(set(stages(j)) == {"prepare", "fit_factors", "score", "select"} for j in jobs)
    client = MlflowClient(tracking_uri=f"sqlite:///{sweep / 'mlflow.db'}")  # one store per sweep
    runs = client.search_runs([client.get_experiment_by_name("lancet").experiment_id])
    roots = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.data.tags.get("lancet.sweep_root") for r in roots] == [str(sweep.resolve())]
    names = {r.info.run_name for r in runs
             if r.data.tags.get("mlflow.parentRunId") == roots[0].info.run_id}
    assert names == {f"pipeline.until=select influence.alpha={a} "
                     f"influence.query_batch_size={b}" for a in (0.5, 0.9) for b in (1, 8)}
