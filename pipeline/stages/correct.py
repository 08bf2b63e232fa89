"""``ibo``: the correction job (IBO or a baseline) on the selection (LANCET.md section 5)."""

from __future__ import annotations

from cluster.datasets import read_prepared
from cluster.ibo_job import run_ibo
from cluster.runtime import connect
from operators.errors import UserError
from pipeline import specs
from pipeline.dag import StageContext
from pipeline.stages.influence import storage
from pipeline.stages.prepare import model_dir


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    cluster = specs.cluster(cfg)
    spec = specs.ibo_spec(cfg, model_dir(ctx.inputs["prepare"]))
    select_dir = ctx.inputs["select"] / "select"
    names = spec.objective.objective.datasets
    missing = [n for n in names if not (select_dir / f"{n}.parquet").is_file()]
    if missing:
        hint = ("ibo.method=oracle needs data.label_column (ground truth)" if "clean" in missing
                else "the selection produced no such samples; adjust influence.alpha")
        raise UserError(f"ibo.method={spec.objective.method} needs {missing}: {hint}")
    connect(cluster)
    datasets = {n: read_prepared(select_dir / f"{n}.parquet", cluster) for n in names}
    metrics = run_ibo(datasets, spec, cluster, ctx.out, storage(ctx), cfg.cluster.max_failures)
    ctx.log(f"ibo ({spec.objective.method}): {metrics.get('step', 0)} steps, "
            f"{metrics.get('step_seconds', 0) * 1000:.0f} ms/step, loss {metrics.get('loss', 0):.4f}")
    return {f"ibo/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
