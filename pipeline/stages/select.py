"""``select``: the α rule fills ``set``; the correction datasets are written (LANCET.md 4)."""

from __future__ import annotations

from cluster.selection_io import write_selection
from pipeline import specs
from pipeline.dag import StageContext


def run(ctx: StageContext) -> dict:
    out = ctx.output()
    sizes = write_selection(ctx.input("score").ranked, specs.selection(ctx.cfg), out.root,
                            out.sets, ctx.input("prepare").label_column() or None, ctx.cfg.seed)
    ctx.log("select: " + ", ".join(f"{k[2:]} {v}" for k, v in sizes.items()))
    return {f"select/{k}": v for k, v in sizes.items()}
