"""``python -m bench.correction_suite``: the correction methods on suite scenarios (issue #15).

Per scenario (bench/scenarios.py ``SUITE``): the tiny model is trained, LinFAC ranks its corpus
with the product's default settings, the α rule selects the sets, and every correction method
(``ibo``, ``npo``, ``simnpo``, ``ga_kl``) runs over a sweep of its main knobs around its YAML
defaults. Each run is the job's own loop (``cluster.ibo_local``: same objectives, reference and
update as one DeepSpeed worker, tested equal to it) followed by the evaluation: undesirable rate
on seen and unseen prompts, refusals and distinct-2 on clean prompts, clean perplexity.

Each method's defaults are chosen the same way, from its runs over all scenarios (``choose``);
each method's best run within the utility budget is also taken per scenario. Relearning
(k = 10, 50 fine-tuning steps on the top positive samples) is measured for each method at its
chosen defaults. Writes its RESULTS.md section and one Pareto plot per scenario under
bench/plots/.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from bench import gpu, recall
from bench.correction_plots import pareto_plot
from bench.scenarios import SUITE, Scenario, build, correction_prompts
from cluster.batches import TokenizeConfig
from cluster.dataio import write_parquet_atomic
from cluster.eval_job import EvalSpec
from cluster.ibo_job import IBOSpec
from cluster.ibo_local import correct_in_process
from cluster.ibo_objectives import ObjectiveConfig, get_objective
from cluster.relearn_job import RelearnSpec, relearn
from cluster.selection_io import write_selection
from operators.ibo_loss import IBOLossConfig
from operators.scores import InfluenceConfig, inhibition
from operators.selection import SelectionConfig
from pipeline.evaluation import behaviour, clean_perplexity, judged
from pipeline.judge import Judge, JudgeConfig
from pipeline.specs import PROJECT

BEGIN = "<!-- correction suite section: python -m bench.correction_suite -->"
END = "<!-- end of correction suite section -->"
PLOTS = Path(__file__).resolve().parent / "plots"
SCENARIOS = ("harm-10", "rude-5", "outdated-10", "caps-5", "catchphrase-10-conv",
             "harm-5-long-under")
METHODS = ("ibo", "npo", "simnpo", "ga_kl")
CONTEXT, NEW_TOKENS = 64, 24
# Relearning fine-tunes every method's corrected model at one lr (their own lr differ by 60x).
RELEARN_LR = 1e-3
PPL_BUDGET, REFUSAL_BUDGET = 1.05, 0.05  # ≤ +5 % perplexity, ≤ +5 points of clean refusals
SEEN_TARGET, UNSEEN_TARGET = 0.1, 0.3  # issue #15: ≤ 10 % of before (seen), ≤ 30 % (unseen)
# Each method: a grid over lr × steps, then one knob at a time around its YAML defaults.
# The lr grid reaches down to 5e-5: gradient-ascent methods need small steps not to collapse.
GRID = {"lr": (5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 3e-3), "steps": (15, 30, 60)}
# ibo's β is per token at granularity=token: the lr × steps grid runs at β 1 and 3 per token
# (β 1 also lowering every token of z+, ibo.rejected_tokens=all)
# and at its sequence-level form (β 0.1, the previous defaults), whatever the YAML sets.
ALTERNATIVES = {"ibo": ({"granularity": "token", "beta": 1.0},
                        {"granularity": "token", "beta": 1.0, "rejected_tokens": "all"},
                        {"granularity": "token", "beta": 3.0},
                        {"granularity": "sequence", "beta": 0.1})}
# α reaches down to 0.3: the positive mass includes the noise floor of the max over query
# columns, so on a converged habit α 0.6 took in a third false positives (docs/METHOD.md §4).
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.95)
ONE_AT_A_TIME = {"ibo": {"alpha": ALPHAS, "beta": (0.3, 10.0), "gamma": (0.3, 1.0, 3.0),
                         "rejected_tokens": ("all",), "pair_power": (1.0, 4.0, 16.0)},
                 "npo": {"alpha": ALPHAS, "beta": (0.05, 0.5), "gamma": (0.3, 3.0)},
                 "simnpo": {"alpha": ALPHAS, "beta": (1.0, 5.0), "gamma": (0.3, 3.0)},
                 "ga_kl": {"alpha": ALPHAS, "gamma": (0.3, 3.0)}}


def log(msg: str) -> None:
    print(f"[correction {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class Knobs:
    """One correction run's settings."""

    method: str
    lr: float
    steps: int
    beta: float
    gamma: float
    delta: float = 0.0
    alpha: float = 0.8
    batch_size: int = 8
    granularity: str = "sequence"
    rejected_tokens: str = "distinct"
    pair_power: float = 1.0  # influence.pair_power: only IBO reads the pairs' ε

    def label(self) -> str:
        form = f" per-{self.granularity}" if self.method == "ibo" else ""
        if self.method == "ibo" and self.granularity == "token" and self.rejected_tokens == "all":
            form += " all-tokens"
        power = f" p={self.pair_power:g}" if self.method == "ibo" else ""
        return (f"{self.method}{form} lr={self.lr:g} steps={self.steps} β={self.beta:g} "
                f"γ={self.gamma:g} α={self.alpha:g}{power}")


def yaml_defaults(method: str) -> Knobs:
    """The method's defaults as ``conf/ibo/<method>.yaml`` and the schema set them."""
    conf = yaml.safe_load((PROJECT / "conf" / "ibo" / f"{method}.yaml").read_text())
    influence = yaml.safe_load((PROJECT / "conf" / "influence" / "linfac.yaml").read_text())
    return Knobs(method, float(conf["lr"]), int(conf["steps"]), float(conf.get("beta", 0.1)),
                 float(conf.get("gamma", 1.0)), float(conf.get("delta", 0.0)),
                 float(influence["alpha"]), int(conf["batch_size"]),
                 str(conf.get("granularity", "sequence")),
                 str(conf.get("rejected_tokens", "distinct")),
                 float(influence["pair_power"]) if method == "ibo" else 1.0)


def sweep(method: str) -> list[Knobs]:
    """The grid over lr × steps, then each other knob varied alone, defaults first."""
    base = yaml_defaults(method)
    forms = ({},) + ALTERNATIVES.get(method, ())
    runs = [replace(base, lr=lr, steps=steps, **form) for form in forms
            for lr, steps in itertools.product(GRID["lr"], GRID["steps"])]
    runs += [replace(base, **{knob: value}) for knob, values in ONE_AT_A_TIME[method].items()
             for value in values]
    return [base] + [k for k in dict.fromkeys(runs) if k != base]


@dataclass
class Case:
    """One scenario ready to correct: the model, its ranked corpus and its evaluation sets."""

    scenario: Scenario
    root: Path
    model_dir: Path
    judge: Judge
    prompts: list[dict]
    clean: list[dict]
    ranked: Path
    before: dict


def prepare(s: Scenario, root: Path) -> Case | None:
    """Train, rank with the default LinFAC, evaluate θs; None if it shows no behaviour."""
    corpus, patterns = build(s)
    model, tok, queries = recall.trained(corpus, patterns, epochs=s.epochs, width=s.width,
                                         seed=s.seed)
    judge = Judge(JudgeConfig(patterns=patterns))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    case = Case(s, root, model_dir, judge, correction_prompts(s), corpus.clean_eval,
                root / "ranked.parquet", {})
    case.before = evaluate(model, tok, case)
    if not queries or not case.before["seen"] or not case.before["unseen"]:
        return None
    score, raw = recall.ranked(model, tok, corpus.train, queries[:8], InfluenceConfig(),
                               patterns=patterns)  # the score stage's: with the second hop
    ranked = [{**r, "score": float(s), "inhibition": float(i), "rank": 0}
              for r, s, i in zip(corpus.train, score, inhibition(raw, "max"))]
    write_parquet_atomic(ranked, case.ranked)
    return case


def selected_rows(case: Case, alpha: float, method: str,
                  pair_power: float = 1.0) -> tuple[dict[str, list[dict]], dict]:
    """The datasets ``method`` reads at ``alpha`` (select stage's files) and the set sizes."""
    out = case.root / f"alpha-{alpha:g}-p{pair_power:g}"
    sizes = write_selection(case.ranked, SelectionConfig(alpha=alpha, pair_power=pair_power),
                            out / "scores", out / "select", "planted")
    import pyarrow.parquet as pq
    rows = {n: pq.read_table(out / "select" / f"{n}.parquet").to_pylist()
            for n in get_objective(method).datasets}
    return rows, sizes


def spec_of(case: Case, k: Knobs) -> IBOSpec:
    loss = IBOLossConfig(beta=k.beta, gamma=k.gamma, delta=k.delta, granularity=k.granularity,
                         rejected_tokens=k.rejected_tokens)
    objective = ObjectiveConfig(method=k.method, loss=loss,
                                tokenize=TokenizeConfig(max_length=CONTEXT))
    return IBOSpec(model_path=str(case.model_dir), objective=objective, steps=k.steps, lr=k.lr,
                   batch_size=k.batch_size, checkpoint_every=k.steps,
                   deepspeed_config=str(PROJECT / "conf/deepspeed/zero0.json"))


def evaluate(model, tok, case: Case) -> dict:
    """Seen/unseen undesirable rate, clean refusals, clean distinct-2, clean perplexity."""
    harmful = behaviour(model, tok, case.prompts, case.judge, NEW_TOKENS, CONTEXT)
    clean = behaviour(model, tok, case.clean, case.judge, NEW_TOKENS, CONTEXT)
    texts = [g["generation"] for g in clean["generations"]]
    refused = case.judge.refusals(texts)
    return {"seen": harmful["rate_seen"], "unseen": harmful["rate_unseen"],
            "overrefusal": sum(refused) / len(refused), "distinct2_clean": clean["distinct2"],
            "ppl": clean_perplexity(model, tok, case.clean, CONTEXT)}


def run(case: Case, k: Knobs, relearn_too: bool = False) -> dict:
    rows, sizes = selected_rows(case, k.alpha, k.method, k.pair_power)
    if any(not r for r in rows.values()):
        return {"knobs": k, "skipped": f"empty set at α={k.alpha}: {sizes}"}
    began = time.perf_counter()
    torch.manual_seed(0)
    model, tok, _ = correct_in_process(spec_of(case, k), rows)
    out = {"knobs": k, **evaluate(model, tok, case), "seconds": time.perf_counter() - began}
    if relearn_too:
        out.update(relearning(case, k, model, tok))
    return out


def relearning(case: Case, k: Knobs, model, tok) -> dict:
    """Undesirable rate (seen prompts) after k = 10 and 50 steps of NLL on the top positives,
    at RELEARN_LR for every method."""
    positive, _ = selected_rows(case, k.alpha, "npo")
    seen = [p for p in case.prompts if p["split"] == "seen"]
    spec = RelearnSpec(steps=(10, 50), samples=16, lr=RELEARN_LR, batch_size=k.batch_size)
    eval_spec = EvalSpec(tokenizer_path=str(case.model_dir), max_new_tokens=NEW_TOKENS,
                         tokenize=TokenizeConfig(max_length=CONTEXT))
    texts = relearn(model, tok, positive["positive"], seen, spec, eval_spec)
    return {f"relearn_{n}": judged(seen, t, case.judge)["rate_seen"] for n, t in texts.items()}


def within_budget(r: dict, before: dict) -> bool:
    return ("skipped" not in r and r["ppl"] <= PPL_BUDGET * before["ppl"]
            and r["overrefusal"] <= before["overrefusal"] + REFUSAL_BUDGET)


def meets(r: dict, before: dict) -> bool:
    """Issue #15's criterion on one scenario: the targets on seen and unseen prompts, within
    the utility budget."""
    return (within_budget(r, before) and r["seen"] <= SEEN_TARGET * before["seen"]
            and r["unseen"] <= UNSEEN_TARGET * before["unseen"])


def rate(r: dict) -> float:
    """The undesirable rate of a run: the mean of its seen and unseen rates."""
    return (r["seen"] + r["unseen"]) / 2


def relative(r: dict, before: dict) -> float:
    return (r["seen"] / before["seen"] + r["unseen"] / before["unseen"]) / 2


def choose(method: str, results: dict[str, list[dict]], befores: dict[str, dict]) -> Knobs:
    """The method's defaults from its runs on every scenario: among the settings whose median
    perplexity and clean-refusal increases are within budget, the lowest median relative
    undesirable rate; ties (many settings reach a median of 0 once most scenarios are fully
    corrected) go to the setting that meets the whole target (``meets``: rates and budget) on
    more scenarios, then to the lower mean relative rate, then to the lower mean perplexity (a
    mean, like the rate's tie-break, so that the scenario a setting damages counts: by the
    median, five scenarios within 0.5 % of each other outvoted one at x1.65 against x1.97).
    Without the count, a setting that cleared every rate while one scenario's perplexity rose
    x1.4 beat one that kept every scenario in budget and left 1 prompt of 24 uncorrected."""
    by_knobs: dict[Knobs, list[tuple[dict, dict]]] = {}
    for name, runs in results.items():
        for r in runs:
            if r["knobs"].method == method and "skipped" not in r:
                by_knobs.setdefault(r["knobs"], []).append((r, befores[name]))

    def summarise(pairs):
        rel = [relative(r, b) for r, b in pairs]
        ppl = [r["ppl"] / b["ppl"] for r, b in pairs]
        return (statistics.median(rel), -sum(meets(r, b) for r, b in pairs),
                statistics.mean(rel), statistics.mean(ppl), statistics.median(ppl),
                statistics.median(r["overrefusal"] - b["overrefusal"] for r, b in pairs))

    full = {k: summarise(p) for k, p in by_knobs.items() if len(p) == len(results)}
    feasible = {k: m for k, m in full.items() if m[4] <= PPL_BUDGET and m[5] <= REFUSAL_BUDGET}
    pool = feasible or full
    return min(pool, key=lambda k: pool[k][:4])


def best_within_budget(runs: list[dict], method: str, before: dict) -> dict | None:
    """The method's run with the lowest undesirable rate within the utility budget."""
    ok = [r for r in runs if r["knobs"].method == method and within_budget(r, before)]
    return min(ok, key=lambda r: (rate(r), r["ppl"])) if ok else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="scenario names (default: SCENARIOS)")
    parser.add_argument("--quick", action="store_true", help="defaults only, no sweep")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.time()
    cases, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for s in [s for s in SUITE if s.name in (args.only or SCENARIOS)]:
            log(f"{s.name}: training and ranking")
            case = prepare(s, Path(tmp) / s.name)
            if case is None:
                log(f"{s.name}: no behaviour on the evaluation prompts, left out")
                continue
            cases[s.name] = case
            knobs = [yaml_defaults(m) for m in METHODS] if args.quick else \
                [k for m in METHODS for k in sweep(m)]
            results[s.name] = []
            for k in knobs:
                results[s.name].append(run(case, k))
                log(f"{s.name}: {k.label()} -> {summary_line(results[s.name][-1])}")
        befores = {n: c.before for n, c in cases.items()}
        chosen = {m: choose(m, results, befores) for m in METHODS}
        relearned = {n: {m: run(c, chosen[m], relearn_too=True) for m in METHODS}
                     for n, c in cases.items()}
    from bench.correction_report import render
    text = render(cases, results, chosen, relearned, (time.time() - began) / 60, args.quick)
    print(text)
    if not args.no_write:
        PLOTS.mkdir(exist_ok=True)
        for name, case in cases.items():
            pareto_plot(name, results[name], case.before, chosen, PLOTS / f"correction-{name}.png")
        gpu.write_section(text, BEGIN, END)
    return 0


def summary_line(r: dict) -> str:
    if "skipped" in r:
        return r["skipped"]
    return (f"seen {r['seen']:.2f} unseen {r['unseen']:.2f} refused {r['overrefusal']:.2f} "
            f"ppl {r['ppl']:.3f} ({r['seconds']:.1f}s)")


if __name__ == "__main__":
    sys.exit(main())
