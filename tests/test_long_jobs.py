"""Long jobs: checkpoints kept on storage, and what reaches MLflow (issue #13), on the shared
demo run and cheap reruns of it through the CLI."""

import json

import pytest
from pipeline_cli import DEMO, run_cli, stages

from cluster.ibo_job import IBOSpec, run_config


def test_ray_train_keeps_the_latest_checkpoints_only(tmp_path):
    spec = IBOSpec(model_path="m", deepspeed_config="d", keep_checkpoints=3)
    assert run_config(spec, tmp_path, 2).checkpoint_config.num_to_keep == 3
    with pytest.raises(ValueError, match="keep_checkpoints"):
        IBOSpec(model_path="m", deepspeed_config="d", keep_checkpoints=0)


@pytest.mark.ray
@pytest.mark.slow
def test_finished_jobs_leave_no_checkpoints_behind(demo_run):
    cache, out, _ = demo_run
    runs = sorted(p.name for p in (cache / "_ray_train").glob("*/")
                  if p.name.startswith(("ibo_", "fit_factors_")))
    assert runs == [], f"Ray Train run folders left on storage: {runs}"
    removed = stages(out)["ibo"]["ibo/checkpoint_mb_removed"]
    print(f"ibo checkpoints removed at the end: {removed:.2f} MiB")
    assert removed > 0


def _client(out):
    from mlflow.tracking import MlflowClient
    run = json.loads((out / "run.json").read_text())
    return MlflowClient(tracking_uri=run["tracking_uri"]), run["mlflow_run_id"]


def _children(client, parent):
    found = client.search_runs([parent.info.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {r.info.run_name: r for r in found}


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_names_the_run_logs_curves_and_the_model_under_output_dir(demo_run):
    cache, out, _ = demo_run
    client, run_id = _client(out)
    parent = client.get_run(run_id)
    # no override that changes what is computed (cache_dir, output_dir, cluster.local_cpus are
    # where-to settings): the default name; the sweep test shows named overrides
    assert parent.info.run_name == "lancet"
    location = client.get_experiment(parent.info.experiment_id).artifact_location
    assert location == (out.resolve() / "mlartifacts").as_uri()
    ibo = _children(client, parent)["ibo"]
    steps = [m.step for m in client.get_metric_history(ibo.info.run_id, "loss")]
    steps_done = IBOSpec(model_path="m", deepspeed_config="d").steps  # the demo's ibo.steps
    assert sorted(steps) == list(range(1, steps_done + 1))  # every step, not the checkpoints
    versions = client.search_model_versions("name='lancet-ibo'")
    assert [v.run_id for v in versions] == [ibo.info.run_id]
    report = _children(client, parent)["report"]  # the per-sublayer attribution (issue #17)
    for kind in ("attribution", "dependence"):  # the influence shares, the ablation reliance
        logged = {k for k in report.data.metrics if k.startswith(f"{kind}/layer")}
        assert logged == {f"{kind}/layer{i}_{p}" for i in (0, 1) for p in ("attn", "mlp")}
    logged = {a.path for a in client.list_artifacts(report.info.run_id, "report")}
    assert "report/layer_attribution.png" in logged


@pytest.mark.ray
@pytest.mark.slow
def test_a_rerun_from_the_cache_uploads_nothing_again(demo_run, tmp_path):
    cache, out, _ = demo_run
    client, first_id = _client(out)
    again = tmp_path / "again"
    run_cli(*DEMO, f"cache_dir={cache}", f"output_dir={again}",
            f"mlflow.tracking_uri={client.tracking_uri}")
    second = client.get_run(_client(again)[1])
    first_children = _children(client, client.get_run(first_id))
    for name, child in _children(client, second).items():
        assert child.data.tags["lancet.cached"] == "true"
        if name in ("ibo", "evaluate", "report"):
            assert client.list_artifacts(child.info.run_id) == [], name
            assert child.data.tags["lancet.artifacts_run"] == first_children[name].info.run_id
    assert len(client.search_model_versions("name='lancet-ibo'")) == 1
