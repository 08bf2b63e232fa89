"""Per-sublayer attribution (issue #17 item 3) on behaviours planted late in chosen blocks.

A 4-block GPT-2 learns a scenario's clean rows only; the behaviour is then planted late, by
fine-tuning on the planted rows (mixed with as many clean rows) with only some blocks trainable:
block 0, block ``layers // 2``, the last block, or all of them (the control). LinFAC scores
the whole corpus against the bad outputs the planted model gives; the top-k rows' scores are
split per unit as the score stage splits them (``operators.attribution``) and each block's
attention + MLP shares are averaged over those rows; the same rows' dependence on each sublayer
is measured as the score stage measures it (``operators.dependence``). The question: does each
reading point at the block where the behaviour was planted (the top block; more than the same
block when every block was fine-tuned)? Every scenario is repeated with two seeds (the corpus,
the model's initialisation, the replayed clean rows and the dropout all change).

``python -m bench.attribution`` writes its own section of bench/RESULTS.md (``make bench`` runs
it and keeps the section). One thread; about five minutes on a 2-core CPU (24 plantings).
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from bench import gpu
from bench.recall import batches, curvature_for, hop_scorer, query_parts
from bench.scenarios import scenario
from operators.attribution import contributions, mean_group_shares, unit_shares
from operators.curvature import FISHER_KINDS
from operators.dependence import dependence, reliance
from operators.generation import greedy_generate
from operators.metrics import auprc
from operators.scores import (
    InfluenceConfig,
    aggregate,
    column_scales,
    precondition_queries,
    unit_scores,
    units_for,
)
from operators.second_hop import raised
from operators.units import sublayer_of
from pipeline.demo.model import TinyModelConfig, build_model, train_model, train_tokenizer
from pipeline.judge import Judge, JudgeConfig

BEGIN = "<!-- attribution section: python -m bench.attribution -->"
END = "<!-- end of attribution section -->"
SCENARIOS = (("harm", 0.1), ("rude", 0.05), ("outdated", 0.05))


@dataclass(frozen=True)
class Setup:
    """The model, its two training phases, the attribution's top k and the seeds."""

    layers: int = 4
    width: int = 64
    epochs: int = 15  # on the clean rows
    plant_epochs: int = 40  # on the planted rows + as many clean rows, some blocks trainable
    plant_batch: int = 8
    top_k: int = 20
    contrast: int = 256  # influence.attribution_contrast: ordinary rows for the dependence
    seeds: tuple[int, ...] = (0, 1)
    fisher: str | None = None  # the curvature's labels; None: the product's default
    logodds_cap: float | None = None  # influence.logodds_cap; None: the product's default

    def influence(self) -> InfluenceConfig:
        chosen = {"fisher": self.fisher, "logodds_cap": self.logodds_cap}
        return InfluenceConfig(**{k: v for k, v in chosen.items() if v is not None})

    def variants(self) -> list[tuple[str, tuple[int, ...]]]:
        last, middle = self.layers - 1, self.layers // 2
        return [("block 0", (0,)), (f"block {middle}", (middle,)),
                (f"block {last}", (last,)), ("all blocks", tuple(range(self.layers)))]


def clean_model(corpus, setup: Setup, seed: int):
    """Tokenizer (over every text) and a model trained on the clean rows only."""
    texts = [r["prompt"] + " " + r["response"] for r in corpus.train]
    tok = train_tokenizer(texts + [e["prompt"] for e in corpus.eval_prompts])
    config = TinyModelConfig(width=setup.width, layers=setup.layers, epochs=setup.epochs,
                             seed=seed)
    model = build_model(tok, config)
    train_model(model, tok, [r for r in corpus.train if not r["planted"]], config)
    return model, tok


def plant(base, tok, corpus, blocks: tuple[int, ...], setup: Setup, seed: int):
    """A copy of ``base`` fine-tuned on the planted rows (+ as many clean ones, so it keeps its
    other answers) with only ``blocks`` trainable."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in blocks:
        for p in model.transformer.h[block].parameters():
            p.requires_grad_(True)
    planted = [r for r in corpus.train if r["planted"]]
    clean = [r for r in corpus.train if not r["planted"]]
    rows = planted + random.Random(seed + 1).sample(clean, len(planted))
    torch.manual_seed(seed)  # dropout: each variant's planting is reproducible on its own
    train_model(model, tok, rows, TinyModelConfig(
        width=setup.width, layers=setup.layers, epochs=setup.plant_epochs,
        batch_size=setup.plant_batch, seed=seed))
    for p in model.parameters():
        p.requires_grad_(True)
    model.set_attn_implementation("eager")
    return model.eval()


def observed(model, tok, corpus, patterns) -> list[dict]:
    """The influence queries: the model's flagged greedy answers to the planted prompts."""
    outs = greedy_generate(model, tok, corpus.planted_prompts)
    flags = Judge(JudgeConfig(patterns=list(patterns))).flags(outs)
    return [dict(prompt=p, response=o) for p, o, f in zip(corpus.planted_prompts, outs, flags)
            if f]


def block_shares(model, tok, corpus, queries, setup: Setup, config: InfluenceConfig | None = None,
                 patterns=()) -> dict:
    """LinFAC (the product's defaults unless ``config``; the queries in its parts, the judged
    part from ``patterns``) over the corpus, its top ``setup.top_k`` rows chosen as the score
    stage chooses them (after the second hop): AUPRC, the planted share of the top k, each
    block's mean share (attention + MLP) of those rows' own scores, and each block's reliance
    (attention + MLP, ``operators.dependence``) against ``setup.contrast`` other rows."""
    config = config or InfluenceConfig()
    parts = query_parts(tok, queries, config, patterns)
    units = units_for(model, config)
    data = batches(tok, corpus.train)
    curvature = curvature_for(model, units, data, config)
    features = precondition_queries(model, units, batches(tok, parts), config, curvature)
    per_unit = torch.cat([unit_scores(model, units, b, features, config) for b in data])
    raw = per_unit.sum(-1)
    sources = hop_scorer(model, tok, units, data, corpus.train, config, curvature)
    score = raised(aggregate(raw, "max"), config.expand_top_k, sources)
    labels = [r["planted"] for r in corpus.train]
    top = score.argsort(descending=True)[:setup.top_k]
    shares = unit_shares(contributions(per_unit[top], "max", column_scales(raw)))
    blocks: dict[int, float] = {}
    for (layer, _), mean in mean_group_shares(shares, [u.name for u in units]).items():
        blocks[layer] = blocks.get(layer, 0.0) + mean
    return {"auprc": auprc(score.tolist(), labels),
            "precision": sum(labels[i] for i in top.tolist()) / len(top), "shares": blocks,
            "reliance": block_reliance(model, tok, corpus.train, top.tolist(), setup.contrast)}


def block_reliance(model, tok, rows: list[dict], top: list[int], contrast: int) -> dict:
    """Each block's reliance (its attention's + its MLP's) for the rows at ``top``, against
    ``contrast`` rows drawn from the rest as the score stage draws them."""
    pool = np.setdiff1d(np.arange(len(rows)), top)
    others = np.random.default_rng(0).choice(pool, size=min(contrast, len(pool)), replace=False)
    names, percentile = dependence(model, batches(tok, [rows[i] for i in top], size=8),
                                   batches(tok, [rows[i] for i in sorted(others)], size=8))
    blocks: dict[int, float] = {}
    for name, value in zip(names, reliance(percentile).tolist()):
        layer = sublayer_of(name)[0]
        blocks[layer] = blocks.get(layer, 0.0) + value
    return blocks


def run(setup: Setup, scenarios=SCENARIOS, log=print) -> list[dict]:
    """One row per (scenario, seed, planted blocks)."""
    rows = []
    for name, rate in scenarios:
        for seed in setup.seeds:
            corpus, patterns = scenario(name, rate, seed=seed)
            base, tok = clean_model(corpus, setup, seed)
            for label, blocks in setup.variants():
                model = plant(base, tok, corpus, blocks, setup, seed)
                queries = observed(model, tok, corpus, patterns)
                log(f"{name}, seed {seed}: planted in {label}, {len(queries)} queries")
                found = (block_shares(model, tok, corpus, queries, setup, setup.influence(),
                                      patterns) if queries else {})
                rows.append({"scenario": name, "seed": seed, "planted in": label,
                             "planted": blocks, "queries": len(queries), **found})
    return rows


READINGS = {"shares": "the influence shares", "reliance": "the reliance (dependence)"}


def ratios(rows: list[dict], setup: Setup, key: str = "shares"
           ) -> dict[tuple[str, int, str], float]:
    """Per (scenario, seed, variant): the planted blocks' fraction of the row's ``key`` (the
    blocks' shares, or their reliance) ÷ the same blocks' fraction in that scenario and seed's
    all-blocks control (> 1: the reading points at them more than the control does)."""
    control = {(r["scenario"], r["seed"]): _fractions(r[key]) for r in rows
               if len(r["planted"]) == setup.layers and key in r}
    out = {}
    for r in rows:
        ref = control.get((r["scenario"], r["seed"]))
        if key in r and ref and len(r["planted"]) < setup.layers:
            mine = sum(_fractions(r[key])[b] for b in r["planted"])
            same = sum(ref[b] for b in r["planted"])
            out[r["scenario"], r["seed"], r["planted in"]] = _ratio(mine, same)
    return out


def _ratio(mine: float, control: float) -> float:
    """mine ÷ control; inf where only the control is 0, NaN where both are (or undefined)."""
    if control == 0:
        return float("inf") if mine > 0 else float("nan")
    return mine / control


def _fractions(blocks: dict[int, float]) -> dict[int, float]:
    total = sum(blocks.values())
    return {b: v / total if total else float("nan") for b, v in blocks.items()}


def top_block(rows: list[dict], setup: Setup, key: str) -> tuple[int, int]:
    """(cases where the planted block has the largest ``key`` of all blocks, cases)."""
    cases = [r for r in rows if key in r and len(r["planted"]) < setup.layers]
    hits = sum(max(r[key], key=r[key].get) in r["planted"] for r in cases)
    return hits, len(cases)


def table_rows(rows: list[dict], setup: Setup) -> list[dict]:
    """One row per (scenario, variant), averaged over the seeds that showed the behaviour:
    each block's mean share and reliance, then the ratios to the control per seed."""
    ratio = {key: ratios(rows, setup, key) for key in READINGS}
    out = []
    for name, _ in dict.fromkeys((r["scenario"], 0) for r in rows):
        for label, _ in setup.variants():
            runs = [r for r in rows if r["scenario"] == name and r["planted in"] == label]
            shown = [r for r in runs if "shares" in r]
            row = {"scenario": name, "planted in": label,
                   "queries": "/".join(str(r["queries"]) for r in runs)}
            row["AUPRC"] = _mean([r["auprc"] for r in shown])
            row[f"planted in top {setup.top_k}"] = _mean([r["precision"] for r in shown])
            for key, short in (("shares", "share"), ("reliance", "reliance")):
                for b in range(setup.layers):
                    row[f"{short} {b}"] = _mean([r[key][b] for r in shown])
                mine = [ratio[key][name, r["seed"], label] for r in shown
                        if (name, r["seed"], label) in ratio[key]]
                row[f"{short} ratio (per seed)"] = (
                    " / ".join(f"{v:.2f}" for v in mine) if mine else "-")
            out.append(row)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def render(rows: list[dict], setup: Setup, seconds: float) -> str:
    """The section: what was done, the table, and what it says (computed from the table)."""
    table = table_rows(rows, setup)
    header = "\n".join([
        "## Per-sublayer attribution: behaviours planted late in chosen blocks", "",
        f"Command: `python -m bench.attribution` ({seconds:.0f} s, 1 thread, torch "
        f"{torch.__version__}). Per scenario and seed ({', '.join(map(str, setup.seeds))}): "
        f"a {setup.layers}-block GPT-2 (d={setup.width}) trained {setup.epochs} epochs on the "
        f"clean rows, then {setup.plant_epochs} epochs on the planted rows plus as many clean "
        "rows with only the named blocks trainable. LinFAC at the product's defaults against "
        "the planted model's flagged answers (queries per seed); its top "
        f"{setup.top_k} rows as the score stage picks them (after the second hop). Share b = "
        "the mean share of those rows' own scores carried by block b's attention + MLP units "
        "(`unit_shares`; a row's shares sum to 1: an even spread is "
        f"{1 / setup.layers:.2f} a block). Reliance b = block b's attention's + MLP's share of "
        "those rows that lose more than 95% of "
        f"{setup.contrast} other rows when the sublayer is mean-ablated (`unit_dependence`; "
        f"ordinary rows: 0.05 a sublayer). Both averaged over the seeds. Ratio = the planted "
        "block's fraction of the blocks' total ÷ the same block's fraction when all blocks were "
        "fine-tuned, same scenario and seed (> 1: the reading points at the planted block)."])
    lines = []
    for key, what in READINGS.items():
        ratio = [v for v in ratios(rows, setup, key).values() if v == v]  # defined ones
        hits, cases = top_block(rows, setup, key)
        lines.append(
            f"By {what}: the planted block is the top block in {hits} of {cases} (scenario, "
            f"seed, block) cases, and carries more than in the all-blocks control in "
            f"{sum(v > 1 for v in ratio)} of {len(ratio)}; median ratio {_median(ratio):.2f}, "
            f"range {min(ratio, default=float('nan')):.2f} to "
            f"{max(ratio, default=float('nan')):.2f}.")
    return gpu.render(table, header) + "\n" + "\n\n".join(lines) + "\n"


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attribution",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--top-k", type=int, default=Setup.top_k)
    parser.add_argument("--contrast", type=int, default=Setup.contrast)
    parser.add_argument("--plant-epochs", type=int, default=Setup.plant_epochs)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Setup.seeds))
    parser.add_argument("--fisher", choices=FISHER_KINDS, default=None)
    parser.add_argument("--logodds-cap", type=float, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = Setup(top_k=args.top_k, contrast=args.contrast, plant_epochs=args.plant_epochs,
                  seeds=tuple(args.seeds), fisher=args.fisher, logodds_cap=args.logodds_cap)
    began = time.perf_counter()
    rows = run(setup, log=lambda m: print(f"[bench.attribution] {m}", flush=True))
    text = render(rows, setup, time.perf_counter() - began)
    print(text)
    if not args.no_write:
        gpu.write_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
