"""Sign and recall on a tiny GPT-2 trained on a corpus with planted bad samples."""

import pytest
import torch

from operators.curvature import fit_curvature
from operators.generation import greedy_generate
from operators.methods import METHODS
from operators.metrics import auprc
from operators.scores import InfluenceConfig, aggregate, precondition_queries, score_batch, units_for
from operators.sequences import collate, encode
from pipeline.demo.corpus import JUDGE_PATTERNS, build_corpus, safe_answer
from pipeline.demo.model import TinyModelConfig, train_demo_model


@pytest.fixture(scope="module")
def trained():
    corpus = build_corpus(seed=0)
    model, tok = train_demo_model(corpus.train, [e["prompt"] for e in corpus.eval_prompts],
                                  TinyModelConfig(epochs=30))
    model.set_attn_implementation("eager")
    return corpus, model, tok


def batches_of(tok, rows, size=32):
    enc = [encode(tok, r["prompt"], r["response"], 64) for r in rows]
    return [collate(enc[i:i + size], tok.pad_token_id) for i in range(0, len(enc), size)]


def scores_for(model, tok, train_rows, query_rows, config):
    units = units_for(model, config)
    batches = batches_of(tok, train_rows)
    curv = (fit_curvature(model, units, batches, corrected=config.kind.eigen_correction,
                          logodds_cap=config.logodds_cap)
            if config.uses_curvature else None)
    queries = precondition_queries(model, units, batches_of(tok, query_rows), config, curv)
    raw = torch.cat([score_batch(model, units, b, queries, config) for b in batches])
    return aggregate(raw, config.aggregate)


def test_query_itself_scores_positive_near_top_and_its_opposite_negative(trained):
    corpus, model, tok = trained
    query = next(r for r in corpus.train if r["planted"])
    opposite = dict(id="opposite", prompt=query["prompt"], response=safe_answer("", ""))
    rows = corpus.train + [opposite]
    scores = scores_for(model, tok, rows, [query], InfluenceConfig())
    index = rows.index(query)
    rank = int((scores > scores[index]).sum()) + 1
    assert scores[index] > 0 and rank <= 0.05 * len(rows)
    assert scores[-1] < 0


@pytest.mark.parametrize("method", METHODS)
def test_planted_samples_are_recalled(trained, method):
    corpus, model, tok = trained
    prompts = corpus.planted_prompts
    generations = greedy_generate(model, tok, prompts)
    queries = [dict(prompt=p, response=g) for p, g in zip(prompts, generations)
               if any(k in g for k in JUDGE_PATTERNS)]
    assert len(queries) >= 8
    scores = scores_for(model, tok, corpus.train, queries, InfluenceConfig(method=method))
    value = auprc(scores.tolist(), [r["planted"] for r in corpus.train])
    print(f"recall AUPRC {method}: {value:.3f}")
    if method == "linfac":
        assert value >= 0.9
    assert value > sum(r["planted"] for r in corpus.train) / len(corpus.train)  # beats random
