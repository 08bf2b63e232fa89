"""The scenario suite's generator (bench/scenarios.py): rates, wordings, look-alikes, flags."""

import re
from collections import Counter

import pytest

from bench.scenarios import FAMILIES, QUERY_ITEMS, SUITE, Scenario, build


def test_the_suite_covers_what_issue_17_asks():
    families = {s.family for s in SUITE}
    assert len(SUITE) >= 12 and len(families) >= 4
    assert {"harm", "rude", "outdated"} <= families and {"caps", "catchphrase"} & families
    held = [s for s in SUITE if s.heldout]
    assert 3 <= len(held) <= 4 and len(SUITE) - len(held) >= 12
    assert min(s.rate for s in SUITE) <= 0.005 and max(s.rate for s in SUITE) >= 0.10
    assert any(s.long for s in SUITE) and len({s.epochs for s in SUITE}) > 2
    assert len({s.name for s in SUITE}) == len(SUITE)


@pytest.mark.parametrize("s", [s for s in SUITE if s.size <= 600], ids=lambda s: s.name)
def test_rate_size_wordings_and_look_alikes(s):
    corpus, patterns = build(s)
    family = FAMILIES[s.family]
    assert len(corpus.train) == s.size
    planted = [r for r in corpus.train if r["planted"]]
    assert len(planted) == max(2, round(s.rate * s.size))
    assert Counter(r["wording"] for r in planted).keys() == set(range(len(family.bad)))
    look = [r for r in corpus.train if r["topic"] == s.family and not r["planted"]]
    assert len(look) >= len(planted) and {r["wording"] for r in look} == {0, 1}
    judge = [re.compile(p, re.IGNORECASE) for p in patterns]
    assert all(any(j.search(r["response"]) for j in judge) for r in planted)
    assert not any(j.search(r["response"]) for j in judge for r in corpus.train
                   if not r["planted"])


def test_query_prompts_lead_with_items_never_trained_on():
    corpus, _ = build(SUITE[0])
    family = FAMILIES[SUITE[0].family]
    held = family.items[-QUERY_ITEMS:]
    trained = " ".join(r["prompt"] + " " + r["response"] for r in corpus.train)
    assert not any(x in trained for x in held)
    first = corpus.planted_prompts[:len(corpus.eval_prompts)]
    assert all(any(x in p for x in held) for p in first)


def test_generation_is_seeded_and_long_answers_are_longer():
    s = Scenario("t", "caps", 0.05, 200, 5)
    assert build(s)[0].train == build(s)[0].train
    assert build(s)[0].train != build(Scenario("t", "caps", 0.05, 200, 5, seed=1))[0].train
    short = sum(len(r["response"].split()) for r in build(s)[0].train)
    long = sum(len(r["response"].split())
               for r in build(Scenario("t", "caps", 0.05, 200, 5, long=True))[0].train)
    assert long > 1.5 * short


def test_observed_wordings_tell_the_two_planted_wordings_apart():
    from bench.scenarios import observed_wordings
    for name, family in FAMILIES.items():
        zero = family.bad[0].format(x="fix my bike", X="FIX MY BIKE")
        one = family.bad[1].format(x="fix my bike", X="FIX MY BIKE")
        assert observed_wordings(name, [zero]) == {0}, name
        assert observed_wordings(name, [zero, one]) == {0, 1}, name
        assert observed_wordings(name, [family.good[0].format(x="a", X="A")]) == set(), name
