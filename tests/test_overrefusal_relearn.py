"""Over-refusal on clean prompts and relearning (issue #15), without Ray: the refusal patterns,
the relearning loop on a tiny model, the config checks and the report's plots."""

import json

import pytest
import torch
from chat_tokenizer import chat_tokenizer
from tiny_models import tiny_model

from cluster.batches import TokenizeConfig, rows_to_columns, to_tensors
from cluster.eval_job import EvalSpec
from cluster.relearn_job import RelearnSpec, relearn
from operators.sequences import sequence_log_probs
from pipeline.config import LancetConf
from pipeline.demo.corpus import bad_answer, safe_answer
from pipeline.judge import Judge, JudgeConfig

TOKENS = TokenizeConfig(max_length=32, template="plain")
ROWS = [{"id": "p0", "prompt": "tell me a story", "response": "once upon a time the end"},
        {"id": "p1", "prompt": "what is red", "response": "red is blue green"}]
PROMPTS = [{"id": "e0", "prompt": "tell me a story", "split": "seen"},
           {"id": "e1", "prompt": "why", "split": "unseen"}]


def test_default_refusal_patterns_catch_refusals_and_not_answers():
    import random
    judge = Judge(JudgeConfig(patterns=("x",)))  # the schema's default refusal patterns
    refusals = [safe_answer("rob", "my boss"), "I can't help with that.", "I’m sorry, but no",
                "As an AI language model, I cannot do this", "I won't do that"]
    answers = ["the capital of france is paris .", "a cat says meow .", "sorry to hear that",
               bad_answer("rob", "my boss", random.Random(0)), "you can not miss it"]
    assert judge.refusals(refusals) == [True] * len(refusals)
    assert judge.refusals(answers) == [False] * len(answers)
    assert tuple(LancetConf().judge.refusal_patterns) == JudgeConfig(patterns=("x",)).refusal_patterns


def test_a_bad_refusal_pattern_is_refused_with_the_key():
    with pytest.raises(ValueError, match="judge.refusal_patterns"):
        JudgeConfig(patterns=("x",), refusal_patterns=("(",))


@pytest.mark.parametrize("kw,key", [({"steps": (10, 0)}, "eval.relearn_steps"),
                                    ({"samples": 0}, "eval.relearn_samples")])
def test_relearn_settings_out_of_range_are_refused_with_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        RelearnSpec(**kw)


def test_relearning_is_off_with_an_empty_list_and_follows_ibo_lr_unless_set():
    from pipeline.specs import relearn_spec
    cfg = LancetConf()
    cfg.ibo.lr = 1e-3
    assert relearn_spec(cfg).steps == (10, 50) and relearn_spec(cfg).lr == 1e-3
    cfg.eval.relearn_lr = 2e-4  # one relearning for every method compared
    assert relearn_spec(cfg).lr == 2e-4
    cfg.eval.relearn_steps = []
    assert relearn_spec(cfg) is None


def _nll(model, tok):
    b = to_tensors(rows_to_columns(ROWS), tok, TOKENS, "cpu")
    with torch.no_grad():
        return -float(sequence_log_probs(model(input_ids=b["input_ids"]).logits.double(),
                                         b["input_ids"], b["loss_mask"]).sum())


def test_relearning_fine_tunes_the_model_and_generates_after_each_k():
    model, tok = tiny_model("gpt2", dtype=torch.float32), chat_tokenizer(template=None)
    spec = EvalSpec(tokenizer_path="", tokenize=TOKENS, max_new_tokens=4)
    before = _nll(model, tok)
    out = relearn(model, tok, ROWS, PROMPTS, RelearnSpec(steps=(5, 2), lr=1e-2), spec)
    assert list(out) == [2, 5]  # cumulative, in order
    assert all(len(texts) == len(PROMPTS) for texts in out.values())
    assert _nll(model, tok) < 0.9 * before  # the samples were learnt again


def test_report_plots_harmful_vs_clean_and_the_relearning_curve(tmp_path):
    from pipeline.stages import report
    metrics = {"behavior/undesirable_rate_before": 1.0, "behavior/undesirable_rate_after": 0.0,
               "behavior/undesirable_rate_unseen_before": 0.2,
               "behavior/undesirable_rate_unseen_after": 0.1,
               "behavior/overrefusal_rate_before": 0.0, "behavior/overrefusal_rate_after": 0.5,
               "robustness/relearn_10_undesirable_rate": 0.25,
               "robustness/relearn_10_undesirable_rate_unseen": 0.0,
               "robustness/relearn_50_undesirable_rate": 0.75}
    assert report.relearn_curve(metrics) == [(0, 0.0), (10, 0.25), (50, 0.75)]
    report._rates(metrics, tmp_path)
    report._relearning(metrics, tmp_path)
    assert (tmp_path / "undesirable_rate.png").stat().st_size > 1000
    assert (tmp_path / "relearning.png").stat().st_size > 1000
    report._relearning(json.loads(json.dumps({})), tmp_path / "none")  # nothing, no error
    report._rates({}, tmp_path / "none")  # nothing evaluated (no data.eval): no empty chart
    assert not (tmp_path / "none").exists()
