"""Linear datamodeling score: retrain on random half-subsets, correlate predicted and actual.

``python -m bench.lds`` writes its own RESULTS.md section: per method (and per option of the
recall issue, #17), the mean LDS over seeds with a 95 % confidence interval. Each seed draws
its own 150 training rows, base model and 20 halves.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from dataclasses import replace

import torch

from bench.recall import batches, score, trained
from operators.factors import DampingConfig
from operators.metrics import spearman
from operators.scores import InfluenceConfig
from operators.sequences import sequence_losses
from pipeline.demo.corpus import build_corpus
from pipeline.demo.model import TinyModelConfig, build_model, train_model, train_tokenizer

BEGIN = "<!-- lds section: python -m bench.lds -->"
END = "<!-- end of lds section -->"
# label -> the configuration scored; the first rows are the product's defaults per method.
VARIANTS = {
    "linfac": InfluenceConfig(),
    "ekfac": InfluenceConfig(method="ekfac"),
    "kfac": InfluenceConfig(method="kfac"),
    "gradsim-dot": InfluenceConfig(method="gradsim"),
    "gradsim-cosine": InfluenceConfig(method="gradsim", similarity="cosine"),
    "repsim": InfluenceConfig(method="repsim"),
    "linfac, fisher=mixed": InfluenceConfig(fisher="mixed"),
    "linfac, fisher=sampled": InfluenceConfig(fisher="sampled"),
    "linfac, fisher=empirical": InfluenceConfig(fisher="empirical"),
    "ekfac, fisher=mixed": InfluenceConfig(method="ekfac", fisher="mixed"),
    "ekfac, fisher=sampled": InfluenceConfig(method="ekfac", fisher="sampled"),
    "ekfac, fisher=empirical": InfluenceConfig(method="ekfac", fisher="empirical"),
    "linfac, logodds_cap=1": InfluenceConfig(logodds_cap=1.0),
    "ekfac, logodds_cap=1": InfluenceConfig(method="ekfac", logodds_cap=1.0),
    "linfac, damping=0.01": InfluenceConfig(damping=DampingConfig(relative=0.01)),
    "linfac, damping=1": InfluenceConfig(damping=DampingConfig(relative=1.0)),
    "linfac, similarity=cosine": InfluenceConfig(similarity="cosine"),
}
T95 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 8: 2.365, 10: 2.262}


def log(msg: str) -> None:
    print(f"[lds {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def query_losses(model, tok, queries) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([sequence_losses(model.eval(), b) for b in batches(tok, queries)])


def lds(corpus, queries, subsets: int = 20, size: int = 150, seed: int = 0,
        variants: dict[str, InfluenceConfig] | None = None) -> dict[str, float]:
    """LDS of each variant: Spearman between −Σ_{m∈S} I(m, q) and q's loss after training on S,
    over ``subsets`` random halves S, averaged over the queries."""
    rng = random.Random(seed)
    rows = rng.sample(corpus.train, min(size, len(corpus.train)))
    tok = train_tokenizer([r["prompt"] + " " + r["response"] for r in corpus.train]
                          + [q["prompt"] + " " + q["response"] for q in queries])
    config = TinyModelConfig(width=32, epochs=15, seed=seed)
    base = build_model(tok, config)
    train_model(base, tok, rows, config)
    base.set_attn_implementation("eager")
    halves, actual = [], []
    for _ in range(subsets):
        chosen = sorted(rng.sample(range(len(rows)), len(rows) // 2))
        model = build_model(tok, config)
        train_model(model, tok, [rows[i] for i in chosen], config)
        halves.append(chosen)
        actual.append(query_losses(model, tok, queries))
    actual = torch.stack(actual)  # [subsets, queries]
    out = {}
    for name, cfg in (variants or VARIANTS).items():
        # LDS predicts each query's whole-response loss: one query each, no parts
        raw, _, _ = score(base, tok, rows, queries, replace(cfg, query_parts=("response",)))
        predicted = torch.stack([-raw[h].sum(0) for h in halves])  # loss falls as log p rises
        out[name] = sum(spearman(predicted[:, q], actual[:, q])
                        for q in range(len(queries))) / len(queries)
    return out


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the 95 % t interval) over seeds."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    t = T95.get(len(values), 1.96)
    return mean, t * statistics.stdev(values) / math.sqrt(len(values))


def demo_queries(seed: int = 0) -> tuple[object, list[dict]]:
    """The demo corpus and 4 of its model's flagged outputs (the LDS queries)."""
    from pipeline.demo.corpus import JUDGE_PATTERNS
    corpus = build_corpus(seed=seed)
    _, _, queries = trained(corpus, tuple(JUDGE_PATTERNS))
    return corpus, queries[:4]


def render(per_seed: dict[int, dict[str, float]], subsets: int, minutes: float) -> str:
    seeds = sorted(per_seed)
    rows = []
    for name in VARIANTS:
        mean, half = interval([per_seed[s][name] for s in seeds])
        rows.append(f"| {name} | {mean:.3f} ± {half:.3f} | "
                    + " | ".join(f"{per_seed[s][name]:.3f}" for s in seeds) + " |")
    head = "| method | LDS (mean ± 95 % CI) | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    return "\n".join([
        "## Linear datamodeling score", "",
        f"Command: `python -m bench.lds` ({minutes:.1f} min, {torch.get_num_threads()} thread)  ",
        f"The demo corpus and 4 of its model's flagged outputs; per seed, 150 training rows, a "
        f"base model and {subsets} random halves retrained from scratch; Spearman of predicted "
        "vs actual query loss, averaged over queries; mean over seeds with a 95 % t interval. "
        "The first rows are each method at the product's defaults, then LinFAC's and EK-FAC's "
        "options.", "", head, "|" + "---|" * (len(seeds) + 2), *rows, ""])


def main(argv: list[str] | None = None) -> int:
    from bench import gpu
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--subsets", type=int, default=20)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.time()
    corpus, queries = demo_queries()
    per_seed = {}
    for seed in range(args.seeds):
        log(f"seed {seed}")
        per_seed[seed] = lds(corpus, queries, subsets=args.subsets, seed=seed)
    text = render(per_seed, args.subsets, (time.time() - began) / 60)
    print(text)
    if not args.no_write:
        gpu.write_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
