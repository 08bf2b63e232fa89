"""``python -m bench.suite``: recall of every method on the scenario suite (issue #17).

Writes its own section of bench/RESULTS.md (kept by ``make bench``): per scenario the AUPRC and
recall@k of each method of ``bench.recall.METHODS`` (B = 1, ``aggregate=max``, the default) and
of kronfluence's EK-FAC and KFAC; the medians over development and held-out scenarios; how often
LinFAC is within ``TIE`` of the best baseline; and LinFAC's options (``OPTIONS``: the Fisher's
labels, damping, normalised influence, the training tokens, grouped query batches, the
aggregation rules, kronfluence's choices) as their effect on the medians. Held-out scenarios
never choose a default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench import gpu, recall, suite_draws
from bench.run import table
from bench.scenarios import SUITE, Scenario, build, observed_wordings
from operators.factors import DampingConfig
from operators.scores import AGGREGATES, MEASURED_AGGREGATES, InfluenceConfig, aggregate

BEGIN = "<!-- suite section: python -m bench.suite -->"
END = "<!-- end of suite section -->"
MAX_QUERIES = 8  # the first flagged generations: held-out items first (build's order)
TIE = 0.005
RULES = AGGREGATES + MEASURED_AGGREGATES
FIRST = "first pass "  # a rule's key prefix for the first pass's scores (no second hop)


def log(msg: str) -> None:
    print(f"[suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# LinFAC's options, each changed alone from the product's default InfluenceConfig():
# label -> (InfluenceConfig overrides, recall.score keyword arguments).
OPTIONS = {
    "logodds_cap=1": ({"logodds_cap": 1.0}, {}),
    "logodds_cap=3": ({"logodds_cap": 3.0}, {}),
    "logodds_cap=15": ({"logodds_cap": 15.0}, {}),
    "logodds_cap=30": ({"logodds_cap": 30.0}, {}),
    "fisher=mixed, seed 1": ({"fisher": "mixed"}, {"seed": 1}),
    "fisher=sampled": ({"fisher": "sampled"}, {}),
    "fisher=sampled, seed 1": ({"fisher": "sampled"}, {"seed": 1}),
    "fisher=empirical": ({"fisher": "empirical"}, {}),
    "damping=0.01": ({"damping": DampingConfig(relative=0.01)}, {}),
    "damping=1": ({"damping": DampingConfig(relative=1.0)}, {}),
    "damping_absolute=1e-8 (kronfluence's)": ({"damping": DampingConfig(absolute=1e-8)}, {}),
    "similarity=cosine (normalised)": ({"similarity": "cosine"}, {}),
    "train_on_prompt=true": ({}, {"train_on_prompt": True}),
    "B=4, grouping=order": ({"query_batch_size": 4, "query_grouping": "order"}, {}),
    "B=4, grouping=similarity": ({"query_batch_size": 4, "query_grouping": "similarity"}, {}),
    "query_parts=[response] (one query per output)": ({"query_parts": ("response",)}, {}),
    "query_parts=[response, judged]": ({"query_parts": ("response", "judged")}, {}),
    "query_parts=[response, opening]": ({"query_parts": ("response", "opening")}, {}),
    "query_parts=[judged, opening]": ({"query_parts": ("judged", "opening")}, {}),
    "opening_tokens=1": ({"opening_tokens": 1}, {}),
    "opening_tokens=5": ({"opening_tokens": 5}, {}),
    "opening_outside_judged=keep": ({"opening_outside_judged": "keep"}, {}),
    "expand_top_k=0 (first pass only)": ({"expand_top_k": 0}, {}),
    "expand_top_k=10": ({"expand_top_k": 10}, {}),
    "expand_top_k=100": ({"expand_top_k": 100}, {}),
}
KFAC_AS_KRONFLUENCE = "kfac, damping_absolute=1e-8 (kronfluence's)"


def _label(method: str, sim: str) -> str:
    return method + (f"-{sim}" if method == "gradsim" else "")


def measure(s: Scenario, kron: bool) -> dict:
    """One scenario: {"scenario", "queries", ..., "scores": {(method, rule): quality dict}};
    LinFAC's options are keyed ``("linfac " + option, "max")``."""
    corpus, patterns = build(s)
    model, tok, queries = recall.trained(corpus, patterns, epochs=s.epochs, width=s.width,
                                         seed=s.seed)
    queries = queries[:MAX_QUERIES]
    out = {"scenario": s, "planted": sum(r["planted"] for r in corpus.train),
           "rows": len(corpus.train), "queries": len(queries), "scores": {}}
    if not queries:
        return out
    labels = [r["planted"] for r in corpus.train]
    # planted rows in a wording the queries show: what the observed outputs can be traced to
    shown = observed_wordings(s.family, [q["response"] for q in queries])
    out["shown"] = sorted(shown)

    def record(key, config, rules=(), **kwargs):
        """The product's score (first pass, then the second hop) under ``(key, "max")``; the
        first pass alone under ``(key, FIRST + rule)`` for each aggregation rule."""
        final, raw = recall.ranked(model, tok, corpus.train, queries, config,
                                   patterns=patterns, **kwargs)
        out["scores"][(key, "max")] = _quality(final, labels, seen_labels)
        for rule in rules:
            out["scores"][(key, FIRST + rule)] = _quality(aggregate(raw, rule), labels,
                                                          seen_labels)

    seen_labels = [r["planted"] and r["wording"] in shown for r in corpus.train]
    for method, sim in recall.METHODS:
        record(_label(method, sim), InfluenceConfig(method=method, similarity=sim), RULES)
    for option, (overrides, kwargs) in OPTIONS.items():
        record(f"linfac {option}", InfluenceConfig(**overrides), **kwargs)
    record(KFAC_AS_KRONFLUENCE, InfluenceConfig(method="kfac",
                                                damping=DampingConfig(absolute=1e-8)))
    if kron:  # kronfluence as its users run it: one pass, its own damping and labels
        for strategy in ("ekfac", "kfac"):
            raw, _ = recall.kronfluence_scores(model, tok, corpus, queries, strategy, patterns)
            out["scores"][(f"kronfluence-{strategy}", "max")] = _quality(
                aggregate(raw, "max"), labels, seen_labels)
    return out


def _quality(score, labels: list[bool], shown_labels: list[bool]) -> dict:
    """AUPRC and recall@k against the planted rows, and AUPRC against those in a shown wording
    (NaN when the queries show none)."""
    shown = recall.quality(score, shown_labels)["auprc"] if any(shown_labels) else float("nan")
    return {**recall.quality(score, labels), "auprc_shown": shown}


def methods_of(results: list[dict]) -> list[str]:
    """The methods compared at the default rule, in table order (the normalised option aside)."""
    seen = {m for r in results for (m, rule) in r["scores"] if rule == "max"}
    order = [_label(m, s) for m, s in recall.METHODS] + ["kronfluence-ekfac", "kronfluence-kfac"]
    return [m for m in order if m in seen]


def per_scenario(results: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for r in results:
        s = r["scenario"]
        row = {"scenario": s.name, "split": "held-out" if s.heldout else "dev",
               "planted/rows": f"{r['planted']}/{r['rows']}", "epochs": s.epochs,
               "width": s.width, "long": "yes" if s.long else "no", "queries": r["queries"],
               "wordings shown": ",".join(map(str, r.get("shown", []))) or "-"}
        for m in methods:
            q = r["scores"].get((m, "max"))
            row[m] = f"{q['auprc']:.3f} / {q['recall_at_k']:.2f}" if q else "-"
        rows.append(row)
    return rows


def _median(results: list[dict], method: str, rule: str, key: str = "auprc") -> float:
    values = [r["scores"][(method, rule)][key] for r in results if (method, rule) in r["scores"]]
    values = [v for v in values if v == v]  # NaN: no planted row in a shown wording
    return statistics.median(values) if values else float("nan")


def summary(dev: list[dict], held: list[dict], methods: list[str]) -> list[dict]:
    return [{"method": m, "dev median AUPRC": _median(dev, m, "max"),
             "held-out median AUPRC": _median(held, m, "max"),
             "dev median AUPRC, shown wordings": _median(dev, m, "max", "auprc_shown"),
             "held-out median AUPRC, shown wordings": _median(held, m, "max", "auprc_shown"),
             "dev median recall@k": _median(dev, m, "max", "recall_at_k"),
             "held-out median recall@k": _median(held, m, "max", "recall_at_k")}
            for m in methods]


def linfac_ties(results: list[dict], methods: list[str]) -> tuple[int, int]:
    """(scenarios where LinFAC's AUPRC ≥ the best baseline's − TIE, scenarios with queries)."""
    scored = [r for r in results if r["scores"]]
    wins = sum(r["scores"][("linfac", "max")]["auprc"] >=
               max(r["scores"][(m, "max")]["auprc"] for m in methods if m != "linfac") - TIE
               for r in scored)
    return wins, len(scored)


def options(dev: list[dict], held: list[dict]) -> list[dict]:
    """Median AUPRC of LinFAC at its default and with each option changed alone."""
    rows = []
    for key in ["linfac"] + [f"linfac {o}" for o in OPTIONS] + [KFAC_AS_KRONFLUENCE]:
        rows.append({"setting": "default" if key == "linfac" else key.removeprefix("linfac "),
                     "dev": _median(dev, key, "max"), "held-out": _median(held, key, "max"),
                     "dev, shown": _median(dev, key, "max", "auprc_shown"),
                     "held-out, shown": _median(held, key, "max", "auprc_shown")})
    return rows


def rules(dev: list[dict], held: list[dict]) -> list[dict]:
    """Each aggregation rule's median AUPRC per method, first pass only (no second hop)."""
    rows = []
    for m in [_label(m, s) for m, s in recall.METHODS]:
        row = {"method": m}
        row.update({f"dev {rule}": _median(dev, m, FIRST + rule) for rule in RULES})
        row.update({f"held-out {rule}": _median(held, m, FIRST + rule) for rule in RULES})
        row.update({f"dev {rule}, shown": _median(dev, m, FIRST + rule, "auprc_shown")
                    for rule in RULES})
        rows.append(row)
    return rows


def render(results: list[dict], minutes: float, kron: bool,
           draws: list[dict] = ()) -> str:
    dev = [r for r in results if not r["scenario"].heldout and r["scores"]]
    held = [r for r in results if r["scenario"].heldout and r["scores"]]
    methods = methods_of(results)
    won_dev, n_dev = linfac_ties(dev, methods)
    won_held, n_held = linfac_ties(held, methods)
    empty = [r["scenario"].name for r in results if not r["scores"]]
    if not methods:
        return "\n".join(["## Recall on the scenario suite (issue #17)", "",
                          f"No scenario showed its behaviour: {', '.join(empty)}.", ""])
    lines = [
        "## Recall on the scenario suite (issue #17)", "",
        f"Command: `python -m bench.suite{'' if kron else ' --no-kronfluence'}` "
        f"({minutes:.1f} min, {torch.get_num_threads()} thread)  ",
        "Scenarios: bench/scenarios.py `SUITE` (seeded, generated on CPU; tiny GPT-2 models "
        "trained for the epochs shown). Queries: the model's own flagged generations, first on "
        f"items never trained on, at most {MAX_QUERIES}. Cells: AUPRC / recall@k of each of "
        "the product's methods at its defaults (B = 1, `aggregate=max`, then the second hop "
        "from the top 30 rows, `influence.expand_top_k`); kronfluence as its users run it "
        "(one pass, its own damping and labels, the same query parts). Held-out scenarios are "
        "never used to choose a default. Every "
        "behaviour is planted in two wordings (0, 1); *wordings shown*: those the queries "
        "show. The *shown wordings* medians count as positives only the planted rows in a "
        "shown wording (what the observed outputs can be traced to).", "",
        table(per_scenario(results, methods)), "",
        "### Medians (default rule, max)", "", table(summary(dev, held, methods)), "",
        f"LinFAC within {TIE} AUPRC of the best other method (kronfluence included): "
        f"{won_dev} of {n_dev} development scenarios, {won_held} of {n_held} held-out.", ""]
    if empty:
        lines += [f"No flagged generation (nothing to recall, left out of the medians): "
                  f"{', '.join(empty)}.", ""]
    lines += ["### LinFAC's options: median AUPRC", "",
              "The product's default LinFAC (`InfluenceConfig()`, B = 1, max) and each option "
              "changed alone; the last row is our KFAC with kronfluence's damping. Decide on the "
              "dev columns only (*shown*: positives are the planted rows in a wording the "
              "queries show).", "", table(options(dev, held)), "",
              "### Aggregation rules: median AUPRC per method", "",
              "The first pass alone (no second hop). `max`, `mean`: operators.scores.aggregate "
              "(config options); `zmax`: max over centred, standardised columns; `rank`: mean "
              "per-column rank.", "",
              table(rules(dev, held)), ""]
    if draws:
        lines += ["### The suite drawn again", "",
                  "Every scenario regenerated with other seeds (corpus, model, queries; "
                  "bench/suite_draws.py), LinFAC at the default, at `logodds_cap=1` (the "
                  "plain likelihood), with every opening kept "
                  "(`opening_outside_judged=keep`, the default before 2026-12-04) and without the "
                  "second hop (`expand_top_k=0`, the default before 2026-12-05). Defaults are "
                  "chosen by the development median of every draw, not of one.", "",
                  table(draws), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-kronfluence", action="store_true")
    parser.add_argument("--only", nargs="*", help="scenario names (default: the whole suite)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--no-draws", action="store_true",
                        help="skip the suite drawn again with other seeds")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began, results = time.time(), []
    for s in SUITE:
        if args.only and s.name not in args.only:
            continue
        log(s.name)
        results.append(measure(s, not args.no_kronfluence))
    draws = [] if args.no_draws or args.only else suite_draws.all_draws(results, log, MAX_QUERIES)
    text = render(results, (time.time() - began) / 60, not args.no_kronfluence, draws)
    print(text)
    if not args.no_write:
        gpu.write_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
