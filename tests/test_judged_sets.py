"""The evaluate stage's label-free look at the influence sets: how many of D_IF+'s (and D_IF−'s)
samples the judge flags on their own responses."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import Selection
from pipeline.judge import Judge, JudgeConfig
from pipeline.stages.evaluate import judged_sets
from pipeline.summary import summary


def _selection(tmp_path, positive: list[str], negative: list[str]) -> Selection:
    sets = tmp_path / "select"
    sets.mkdir()
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(len(positive))],
                             "prompt": ["q"] * len(positive), "response": positive}),
                   sets / "positive.parquet")
    n = max(len(positive), len(negative))  # the smaller set cycled, as write_selection pairs
    pq.write_table(pa.table({"pos_id": [f"p{i % len(positive)}" for i in range(n)],
                             "neg_id": [f"n{i % len(negative)}" for i in range(n)],
                             "neg_response": [negative[i % len(negative)] for i in range(n)]}),
                   sets / "pairs.parquet")
    return Selection(tmp_path)


def test_shares_of_each_set_the_judge_flags(tmp_path):
    judge = Judge(JudgeConfig(patterns=("frosty",)))
    selection = _selection(tmp_path, ["stay frosty !", "keep it frosty", "the plum is purple ."],
                           ["no .", "ok .", "keep it frosty"])
    out = judged_sets(selection, judge, seed=0)
    assert out == {"detect/positive_judged_share": 2 / 3, "detect/positive_judged_rows": 3,
                   "detect/negative_judged_share": 1 / 3, "detect/negative_judged_rows": 3}


def test_a_large_set_is_judged_on_a_seeded_sample(tmp_path):
    judge = Judge(JudgeConfig(patterns=("frosty",)))
    positive = ["frosty"] * 30 + ["plain"] * 70
    selection = _selection(tmp_path, positive, ["no ."])
    first = judged_sets(selection, judge, seed=3, limit=40)
    assert first["detect/positive_judged_rows"] == 40
    assert 0 < first["detect/positive_judged_share"] < 1
    assert judged_sets(selection, judge, seed=3, limit=40) == first


def test_a_negative_sample_the_pairs_repeat_is_judged_once(tmp_path):
    judge = Judge(JudgeConfig(patterns=("frosty",)))
    selection = _selection(tmp_path, ["a", "b", "c", "d", "frosty"], ["frosty", "no ."])
    out = judged_sets(selection, judge, seed=0, limit=10)  # 5 pairs: n0 n1 n0 n1 n0
    assert out["detect/negative_judged_rows"] == 2
    assert out["detect/negative_judged_share"] == 0.5


def test_no_sets_no_figures_and_the_summary_line(tmp_path):
    judge = Judge(JudgeConfig(patterns=("frosty",)))
    assert judged_sets(Selection(tmp_path), judge, seed=0) == {}
    from pipeline.config import LancetConf
    out = {"results": {"evaluate": {"detect/positive_judged_share": 0.5,
                                    "detect/positive_judged_rows": 4,
                                    "detect/negative_judged_share": 0.0}},
           "tracking_uri": "sqlite:///x.db", "run_id": None}
    text = summary(LancetConf(), out)
    assert ("judge on the sets:   0.500 of 4 positive samples flagged, 0.000 of negative "
            "(their own responses)") in text


def test_a_classifier_judge_reads_the_sets_as_it_reads_generations(tmp_path):
    """With a classifier judge (a tiny sequence classifier from a config) the shares are its
    flags on the sets' responses, the same call that judges the generations."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from pipeline.demo.model import train_tokenizer
    positive = ["stay frosty , pal !", "keep it frosty", "the plum is purple ."]
    negative = ["no .", "ok ."]
    tok = train_tokenizer(positive + negative)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2,
                        num_labels=2, id2label={0: "safe", 1: "unsafe"},
                        label2id={"safe": 0, "unsafe": 1}, pad_token_id=tok.pad_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    judge = Judge(JudgeConfig(kind="classifier", path=str(tmp_path / "clf"), threshold=0.0))
    (tmp_path / "run").mkdir()
    out = judged_sets(_selection(tmp_path / "run", positive, negative), judge, seed=0)
    # threshold 0: every text is flagged unsafe, whatever the random weights say
    assert out == {"detect/positive_judged_share": 1.0, "detect/positive_judged_rows": 3,
                   "detect/negative_judged_share": 1.0, "detect/negative_judged_rows": 2}
    strict = Judge(JudgeConfig(kind="classifier", path=str(tmp_path / "clf"), threshold=1.0))
    none = judged_sets(Selection(tmp_path / "run"), strict, seed=0)
    assert none["detect/positive_judged_share"] == 0.0  # no probability reaches 1 exactly

