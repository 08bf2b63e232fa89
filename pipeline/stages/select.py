"""``select``: the α rule fills ``set``; the correction datasets are written (LANCET.md 4)."""

from __future__ import annotations

import json

from cluster.selection_io import write_selection
from pipeline import specs
from pipeline.dag import StageContext
from pipeline.stages.influence import RANKED


def run(ctx: StageContext) -> dict:
    info = json.loads((ctx.inputs["prepare"] / "info.json").read_text())
    sizes = write_selection(ctx.inputs["score"] / RANKED, specs.selection(ctx.cfg), ctx.out,
                            ctx.out / "select", info.get("label_column") or None, ctx.cfg.seed)
    ctx.log("select: " + ", ".join(f"{k[2:]} {v}" for k, v in sizes.items()))
    return {f"select/{k}": v for k, v in sizes.items()}
