"""The correction benchmark's choices (bench/correction_suite.py): sweeps, fronts, defaults."""

from dataclasses import replace

from bench.correction_plots import front
from bench.correction_suite import (
    GRID,
    METHODS,
    best_within_budget,
    choose,
    sweep,
    yaml_defaults,
)


def test_each_sweep_starts_at_the_yaml_defaults_and_covers_the_grid():
    for method in METHODS:
        runs = sweep(method)
        assert runs[0] == yaml_defaults(method)
        assert len(set(runs)) == len(runs)
        assert {(k.lr, k.steps) for k in runs} >= {(lr, s) for lr in GRID["lr"]
                                                   for s in GRID["steps"]}


def test_the_front_keeps_only_points_nothing_beats_on_both_axes():
    points = [(1.0, 0.3), (2.0, 0.1), (3.0, 0.2), (0.5, 0.5), (1.5, 0.3)]
    assert front(points) == [(0.5, 0.5), (1.0, 0.3), (2.0, 0.1)]


def run(knobs, seen, unseen, ppl, refused=0.0):
    return {"knobs": knobs, "seen": seen, "unseen": unseen, "ppl": ppl, "overrefusal": refused}


def test_defaults_are_the_lowest_median_rate_within_the_utility_budget():
    base = yaml_defaults("ibo")
    harsh, gentle, idle = (replace(base, lr=1e-2), replace(base, lr=5e-4),
                           replace(base, lr=1e-6))
    before = {"seen": 1.0, "unseen": 1.0, "ppl": 2.0, "overrefusal": 0.0}
    results = {name: [run(harsh, 0.0, 0.0, 3.0), run(gentle, 0.1, 0.2, 2.05),
                      run(idle, 1.0, 1.0, 2.0)] for name in ("a", "b", "c")}
    results["c"][1] = run(gentle, 0.0, 0.1, 2.02, refused=0.5)  # one scenario over-refuses
    befores = dict.fromkeys(results, before)
    assert choose("ibo", results, befores) == gentle  # harsh breaks the perplexity budget
    assert best_within_budget(results["a"], "ibo", before)["knobs"] == gentle
    assert best_within_budget(results["c"], "ibo", before)["knobs"] == idle  # refusals


def test_ties_on_the_rate_go_to_the_lower_mean_perplexity_so_a_damaged_scenario_counts():
    base = yaml_defaults("ibo")
    even, spiky = replace(base, lr=1e-3), replace(base, lr=2e-3)
    before = {"seen": 1.0, "unseen": 1.0, "ppl": 1.0, "overrefusal": 0.0}
    results = {name: [run(even, 0.0, 0.0, 1.012), run(spiky, 0.0, 0.0, 1.010)]
               for name in "abcde"}
    results["f"] = [run(even, 0.0, 0.0, 1.4), run(spiky, 0.0, 0.0, 1.9)]
    # the median perplexity (1.012 against 1.010) would take spiky
    assert choose("ibo", results, dict.fromkeys(results, before)) == even


def test_ties_on_the_median_rate_go_first_to_the_setting_meeting_the_target_on_more_scenarios():
    base = yaml_defaults("ibo")
    clears, keeps = replace(base, lr=1e-3), replace(base, alpha=0.3)
    before = {"seen": 1.0, "unseen": 1.0, "ppl": 1.0, "overrefusal": 0.0}
    results = {name: [run(clears, 0.0, 0.0, 1.01), run(keeps, 0.0, 0.0, 1.01)] for name in "abcde"}
    # clears every rate but damages f; keeps leaves 1 prompt in 24 there, within every target
    results["f"] = [run(clears, 0.0, 0.0, 1.4), run(keeps, 1 / 24, 0.0, 1.02)]
    assert choose("ibo", results, dict.fromkeys(results, before)) == keeps
