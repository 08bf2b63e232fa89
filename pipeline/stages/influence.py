"""``fit_factors`` and ``score``: the distributed influence stages (LANCET.md sections 1-3)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq

from cluster.attribution import attribute_on_worker, attribution_step, wait_for_attribution
from cluster.datasets import read_prepared
from cluster.factor_job import fit_factors, passes
from cluster.progress import Progress
from cluster.runtime import connect
from cluster.score_shards import RAW, features_in, missing_shards, plan_shards, score_shards
from cluster.scoring import Ranking, finalize, rank_rows
from cluster.second_hop import (
    Hop,
    combine,
    hop_spec,
    prepare_folder,
    source_positions,
    source_rows,
)
from pipeline import specs
from pipeline.dag import StageContext
from pipeline.fingerprints import data_fingerprint, model_fingerprint
from pipeline.locations import ray_storage


def rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def run_fit(ctx: StageContext) -> dict:
    cfg, prepared, out = ctx.cfg, ctx.input("prepare"), ctx.output()
    model = prepared.model_dir()
    method = specs.influence(cfg).method
    meta = {"method": method, "model_fingerprint": model_fingerprint(model),
            "data_fingerprint": data_fingerprint(prepared.train)}
    if not specs.influence(cfg).uses_curvature:
        out.meta.write_text(json.dumps({**meta, "units": []}, indent=2))
        ctx.log(f"influence.method={method} needs no curvature: nothing to fit")
        return {}
    cluster = specs.cluster(cfg)
    connect(cluster)
    spec = specs.factor_spec(cfg, model)
    train = prepared.train
    with Progress("fit_factors", passes(spec) * rows(train), ctx.log,
                  every_s=cfg.cluster.progress_every_s) as progress:
        metrics = fit_factors(read_prepared(train, cluster), spec, cluster, out.root,
                              ray_storage(cfg), cfg.cluster.max_failures, progress.counter)
    units = json.loads(out.units.read_text())
    meta.update(units=units, counts={"sequences": metrics["sequences"],
                                     "tokens": metrics["tokens"]},
                dtypes={"factors": "float64", "model": cfg.model.dtype},
                fisher=cfg.influence.fisher, logodds_cap=spec.logodds_cap,
                damping=cfg.influence.damping)
    out.meta.write_text(json.dumps(meta, indent=2))
    ctx.log(f"fit_factors: {metrics['sequences']:.0f} sequences, "
            f"{metrics['sequences_per_s']:.1f} seq/s, {metrics['tokens_per_s']:.0f} tokens/s")
    return {f"fit/{k}": v for k, v in metrics.items()}


def run_score(ctx: StageContext) -> dict:
    """Score the corpus by shard into ``ctx.work`` (kept if killed), then rank (finalize)."""
    cfg, prepared, work = ctx.cfg, ctx.input("prepare"), ctx.work or ctx.out / "_work"
    cluster = specs.cluster(cfg)
    spec = specs.score_spec(cfg, prepared.model_dir())
    queries = pq.read_table(prepared.queries).to_pylist()
    train = prepared.train
    shards = plan_shards(train, cfg.cluster.score_shard_rows, cluster.num_workers)
    todo = missing_shards(work, shards)
    ctx.log(f"score: {len(shards) - len(todo)} of {len(shards)} shards reused from {work}")
    metrics = _score_missing(ctx, spec, queries, train, todo, cluster, work)
    first = rank_rows(work / RAW, cfg.influence.aggregate)
    hop, hop_metrics = _second_hop(ctx, spec, first, train, shards, cluster, work)
    summary = finalize(work / RAW, ctx.output().ranked, cfg.influence.aggregate,
                       _attribution(ctx, spec, queries, cluster, work),
                       None if hop is None else partial(combine, hop), first)
    if summary["nonfinite"]:
        ctx.log(f"WARNING: {summary['nonfinite']} samples had NaN/inf gradients and are "
                f"excluded: {summary['nonfinite_ids'][:10]}")
    # queries in parts: every query's response, judged and opening parts (operators/query_parts)
    ctx.log(f"score: {len(queries)} queries in {summary['query_batches']} query batches "
            f"(influence.query_parts={list(spec.influence.query_parts)}, "
            f"opening_outside_judged={spec.influence.opening_outside_judged}, "
            f"query_batch_size={spec.influence.query_batch_size})")
    return {"score/sequences_per_s": metrics["sequences_per_s"],
            "score/tokens_per_s": metrics["tokens_per_s"],
            "score/query_batches": summary["query_batches"],
            "score/nonfinite": summary["nonfinite"], "score/rows": summary["rows"],
            "score/shards_reused": len(shards) - len(todo), "score/shards_scored": len(todo),
            "score/raised_by_second_hop": summary["raised_by_second_hop"], **hop_metrics,
            **{k: v for k, v in summary.items() if k.startswith("attribution/")}}


def _second_hop(ctx: StageContext, spec, first: Ranking, train: Path, shards, cluster,
                work: Path) -> tuple[Hop | None, dict]:
    """The second pass (cluster/second_hop.py): the top rows of ``first`` (the first pass's
    ranking) scored as queries, by the same resumable shards under ``work/hop``; (None, ...)
    when off or no row scored above 0."""
    k = spec.influence.expand_top_k
    none = {"score/second_hop_sources": 0}
    if not k:
        return None, none
    positions = source_positions(first.score, first.rank, k)
    if not len(positions):
        ctx.log("score: no row scored above 0: no second hop")
        return None, none
    ids = [str(i) for i in first.ids[positions]]
    folder = prepare_folder(work, ids)
    todo = missing_shards(folder, shards)
    ctx.log(f"score: second hop from the top {len(ids)} rows (influence.expand_top_k={k}): "
            f"{len(shards) - len(todo)} of {len(shards)} shards reused")
    _score_missing(ctx, hop_spec(spec), source_rows(work / RAW, positions), train, todo,
                   cluster, folder, stage="score (second hop)")
    return Hop(folder / RAW, positions, ids), {
        "score/second_hop_sources": len(ids),
        "score/second_hop_shards_reused": len(shards) - len(todo),
        "score/second_hop_shards_scored": len(todo)}


def _factors(ctx: StageContext, spec) -> Path | None:
    return ctx.input("fit_factors").root if spec.influence.uses_curvature else None


def _attribution(ctx: StageContext, spec, queries, cluster, work: Path):
    """``finalize``'s extra step: the top rows re-scored per unit on a worker, for their
    ``unit_shares`` and ``unit_dependence`` columns (None: off, or a method without units)."""
    if not spec.attributes:
        if spec.attribution_top_k:
            ctx.log(f"score: influence.method={spec.influence.method} has no units: no "
                    "per-sublayer attribution")
        return None
    how = ctx.cfg.influence.aggregate

    def rescore(rows, contrast, scales):
        connect(cluster)
        features = features_in(work, spec, queries, _factors(ctx, spec), cluster)
        against = (f", and their dependence against {contrast.num_rows} others"
                   if contrast is not None else "")
        ctx.log(f"score: attributing the top {rows.num_rows} rows to their units{against}")
        found = wait_for_attribution(attribute_on_worker(spec, features, rows, contrast,
                                                         scales, how, cluster))
        if found.skipped:
            ctx.log(f"score: {found.skipped}")
        return found

    return attribution_step(work / RAW, spec.attribution_top_k, spec.attribution_contrast,
                            rescore)


def _score_missing(ctx: StageContext, spec, queries, train: Path, todo, cluster, work: Path,
                   stage: str = "score") -> dict:
    """Score the missing shards (none: no Ray work at all); their throughput."""
    if todo:
        connect(cluster)
        features = features_in(work, spec, queries, _factors(ctx, spec), cluster)
        total = sum(stop - start for start, stop in todo)
        every_s = ctx.cfg.cluster.progress_every_s
        with Progress(stage, total, ctx.log, every_s=every_s) as progress:
            metrics = score_shards(train, todo, spec, features, cluster, work, progress.counter)
    else:
        metrics = {"sequences": 0, "tokens": 0, "seconds": 0.0}
    seconds = max(metrics["seconds"], 1e-9)
    metrics.update(sequences_per_s=metrics["sequences"] / seconds,
                   tokens_per_s=metrics["tokens"] / seconds)
    ctx.log(f"{stage}: {metrics['sequences']} sequences, {metrics['sequences_per_s']:.1f} seq/s, "
            f"{metrics['tokens_per_s']:.0f} tokens/s")
    return metrics
