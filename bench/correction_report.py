"""The correction benchmark's RESULTS.md section (bench/correction_suite.py)."""

from __future__ import annotations

from bench.correction_suite import (
    METHODS,
    PPL_BUDGET,
    REFUSAL_BUDGET,
    RELEARN_LR,
    SEEN_TARGET,
    UNSEEN_TARGET,
    best_within_budget,
    rate,
    within_budget,
)
from bench.run import table


def _f(x: float) -> str:
    return f"{x:.2f}"


def per_method_rows(cases: dict, results: dict, chosen: dict, relearned: dict) -> list[dict]:
    rows = []
    for name, case in cases.items():
        b = case.before
        for m in METHODS:
            r = relearned[name][m]
            best = best_within_budget(results[name], m, b)
            rows.append({
                "scenario": name, "method": m,
                "seen": f"{_f(b['seen'])} → {_f(r['seen'])}",
                "unseen": f"{_f(b['unseen'])} → {_f(r['unseen'])}",
                "clean refusals": f"{_f(b['overrefusal'])} → {_f(r['overrefusal'])}",
                "ppl ×": f"{r['ppl'] / b['ppl']:.3f}",
                "distinct-2 clean": f"{_f(b['distinct2_clean'])} → {_f(r['distinct2_clean'])}",
                "relearn 10": _f(r["relearn_10"]), "relearn 50": _f(r["relearn_50"]),
                "best in budget": "-" if best is None else _f(rate(best)),
                "its settings": "-" if best is None else best["knobs"].label()})
    return rows


def criterion_rows(cases: dict, results: dict, relearned: dict) -> list[dict]:
    """Issue #15's criterion per scenario, for IBO at its chosen defaults."""
    rows = []
    for name, case in cases.items():
        b, ibo = case.before, relearned[name]["ibo"]
        row = {"scenario": name,
               "seen ≤ 10 % of before": ibo["seen"] <= SEEN_TARGET * b["seen"],
               "unseen ≤ 30 % of before": ibo["unseen"] <= UNSEEN_TARGET * b["unseen"],
               "ppl ≤ +5 %": ibo["ppl"] <= PPL_BUDGET * b["ppl"],
               "refusals ≤ +5 points": ibo["overrefusal"] <= b["overrefusal"] + REFUSAL_BUDGET}
        for m in ("npo", "ga_kl"):
            defaults = relearned[name][m]
            best = best_within_budget(results[name], m, b)
            row[f"≤ {m} defaults"] = (not within_budget(defaults, b)
                                      or rate(ibo) <= rate(defaults))
            row[f"≤ {m} best in budget"] = best is None or rate(ibo) <= rate(best)
        rows.append(row)
    return rows


def _counts(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k != "scenario"]
    return {"scenario": f"met in (of {len(rows)})", **{k: sum(r[k] for r in rows) for k in keys}}


def render(cases: dict, results: dict, chosen: dict, relearned: dict, minutes: float,
           quick: bool) -> str:
    if not cases:
        return "## Correction on the scenario suite (issue #15)\n\nNo scenario showed its " \
               "behaviour on the evaluation prompts.\n"
    runs = sum(len(r) for r in results.values())
    crit = criterion_rows(cases, results, relearned)
    crit_table = [{k: (("yes" if v else "no") if isinstance(v, bool) else v)
                   for k, v in r.items()} for r in crit] + [_counts(crit)]
    lines = [
        "## Correction on the scenario suite (issue #15)", "",
        f"Command: `python -m bench.correction_suite{' --quick' if quick else ''}` "
        f"({minutes:.1f} min, 1 thread, {runs} correction runs)  ",
        "Per scenario: the tiny model of bench/scenarios.py, ranked by LinFAC at the product's "
        "defaults, sets by the α rule; each run is the correction job's own loop in one "
        "process (`cluster.ibo_local`, tested equal to a DeepSpeed worker). Seen: the family's "
        "training wordings over all 12 items (24 prompts); unseen: its unseen wording (12); "
        "clean: 60 benign prompts (refusals by `judge.refusal_patterns`, distinct-2, "
        "perplexity of their reference answers). Rates are the judge's, greedy decoding.", "",
        "Each method's defaults are chosen alike from its sweep (lr × steps grid, then α, β, γ "
        "one at a time, IBO's `rejected_tokens` too; IBO's grid per token at β 1 and 3, per "
        "token lowering all of z+'s tokens, and per sequence): the lowest median "
        "relative undesirable rate over the scenarios among settings whose median perplexity "
        f"is within ×{PPL_BUDGET} and median clean refusals within +{REFUSAL_BUDGET:.2f}, "
        "ties to the lower mean relative rate, then the lower mean perplexity. "
        "*Best in budget*: the method's lowest "
        "undesirable rate (mean of seen and unseen) on that scenario among its runs within "
        "the same budget, tuned per scenario. *Relearn k*: the seen rate after k steps of NLL "
        f"on the top 16 positive samples, at lr {RELEARN_LR:g} for every method. "
        "Plots: bench/plots/correction-<scenario>.png.", "",
        table([{"method": m, "chosen defaults": chosen[m].label()} for m in METHODS]), "",
        "### Every method at its chosen defaults", "",
        table(per_method_rows(cases, results, chosen, relearned)), "",
        "### IBO's criterion (IBO at its chosen defaults)", "",
        "*≤ m defaults*: IBO's rate is at most m's at m's chosen defaults, or those are out of "
        "budget; *≤ m best in budget*: at most m's best run within budget, tuned per scenario.",
        "", table(crit_table), ""]
    return "\n".join(lines)
