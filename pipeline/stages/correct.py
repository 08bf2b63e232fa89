"""``ibo``: the correction job (IBO or a baseline) on the selection (LANCET.md section 5)."""

from __future__ import annotations

from cluster.datasets import read_prepared
from cluster.ibo_job import run_ibo
from cluster.runtime import connect
from operators.errors import UserError
from pipeline import specs
from pipeline.dag import StageContext
from pipeline.locations import ray_storage


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    cluster = specs.cluster(cfg)
    spec = specs.ibo_spec(cfg, ctx.input("prepare").model_dir())
    selection = ctx.input("select")
    names = spec.objective.objective.datasets
    missing = [n for n in names if not selection.set_file(n).is_file()]
    if missing:
        hint = ("it needs data.label_column (ground truth)" if "clean" in missing
                else "the selection produced no such samples; adjust influence.alpha")
        raise UserError(f"ibo.method={spec.objective.method} needs {missing}: {hint}")
    connect(cluster)
    datasets = {n: read_prepared(selection.set_file(n), cluster) for n in names}
    metrics = run_ibo(datasets, spec, cluster, ctx.out, ray_storage(cfg), cfg.cluster.max_failures)
    ctx.log(f"ibo ({spec.objective.method}): {metrics.get('step', 0)} steps, "
            f"{metrics.get('step_seconds', 0) * 1000:.0f} ms/step, loss {metrics.get('loss', 0):.4f}")
    return {f"ibo/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
