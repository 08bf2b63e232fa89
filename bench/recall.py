"""Recall quality per method, single vs batched queries, kronfluence as an external EK-FAC."""

from __future__ import annotations

import copy
import logging
import random
import tempfile
import time

import torch

from operators.curvature import fit_curvature
from operators.generation import greedy_generate
from operators.metrics import auprc, recall_at_k
from operators.query_parts import part_encoding, query_rows
from operators.scores import (
    InfluenceConfig,
    aggregate,
    grouping_order,
    precondition_queries,
    score_batch,
    units_for,
)
from operators.second_hop import hop_config, raised
from operators.sequences import collate, encode, sequence_losses
from operators.units import discover_units
from pipeline.demo.model import TinyModelConfig, train_demo_model
from pipeline.judge import Judge, JudgeConfig

METHODS = [("linfac", "dot"), ("ekfac", "dot"), ("kfac", "dot"), ("gradsim", "dot"),
           ("gradsim", "cosine"), ("repsim", "dot")]


def batches(tok, rows, size=32, context=64, train_on_prompt=False):
    enc = [part_encoding(tok, encode(tok, r["prompt"], r["response"], context,
                                     train_on_prompt=train_on_prompt), r) for r in rows]
    return [collate(enc[i:i + size], tok.pad_token_id) for i in range(0, len(enc), size)]


def query_parts(tok, queries, config: InfluenceConfig, patterns=()) -> list[dict]:
    """The queries in ``config.query_parts`` (as cluster.scoring.query_part_rows), the judged
    part from the judge's ``patterns``; a method without units (repsim) keeps them whole."""
    return query_rows(config, queries, patterns,
                      lambda r: encode(tok, r["prompt"], r["response"], 64), tok)


def trained(corpus, patterns, epochs=20, width=64, seed=0):
    model, tok = train_demo_model(corpus.train, [e["prompt"] for e in corpus.eval_prompts],
                                  TinyModelConfig(width=width, epochs=epochs, seed=seed))
    model.set_attn_implementation("eager")
    judge = Judge(JudgeConfig(patterns=patterns))
    outs = greedy_generate(model, tok, corpus.planted_prompts)
    queries = [dict(id=f"q{i}", prompt=p, response=o)
               for i, (p, o, f) in enumerate(zip(corpus.planted_prompts, outs, judge.flags(outs)))
               if f]
    return model, tok, queries


def score(model, tok, train_rows, queries, config: InfluenceConfig, train_on_prompt=False,
          seed: int = 0, patterns=()):
    """(raw scores [N, Q], fit seconds, score seconds): the first pass only. ``train_on_prompt``:
    the training gradients and factors over the whole sequence (``model.train_on_prompt``);
    ``seed``: of the sampled Fisher's labels; ``patterns``: the judge's, for the judged part."""
    units = units_for(model, config)
    data = batches(tok, train_rows, train_on_prompt=train_on_prompt)
    began = time.perf_counter()
    curv = curvature_for(model, units, data, config, seed)
    fitted = time.perf_counter()
    raw = raw_scores(model, tok, units, data, queries, config, curv, patterns)
    return raw, fitted - began, time.perf_counter() - fitted


def ranked(model, tok, train_rows, queries, config: InfluenceConfig, train_on_prompt=False,
           seed: int = 0, patterns=(), how: str = "max"):
    """(the product's score per row [N], the first pass's raw scores [N, Q]): the first pass
    aggregated by ``how``, then the second hop from its top ``config.expand_top_k`` rows (as
    the score stage, operators/second_hop.py); the curvature is fitted once for both."""
    units = units_for(model, config)
    data = batches(tok, train_rows, train_on_prompt=train_on_prompt)
    curv = curvature_for(model, units, data, config, seed)
    raw = raw_scores(model, tok, units, data, queries, config, curv, patterns)
    sources = hop_scorer(model, tok, units, data, train_rows, config, curv)
    return raised(aggregate(raw, how), config.expand_top_k, sources), raw


def hop_scorer(model, tok, units, data, train_rows, config: InfluenceConfig, curv):
    """``operators.second_hop.raised``'s ``score_sources``: the rows of ``data`` against the
    rows of ``train_rows`` at the given positions, each a query of its own (``hop_config``)."""
    def score_sources(positions):
        rows = [dict(train_rows[i], id=f"hop{i}") for i in positions]
        return raw_scores(model, tok, units, data, rows, hop_config(config), curv)
    return score_sources


def curvature_for(model, units, data, config: InfluenceConfig, seed: int = 0):
    """The curvature ``config``'s method scores with (None for a method without one)."""
    if not config.uses_curvature:
        return None
    return fit_curvature(model, units, data, corrected=config.kind.eigen_correction,
                         fisher=config.fisher, damping=config.damping, seed=seed,
                         logodds_cap=config.logodds_cap)


def raw_scores(model, tok, units, data, queries, config: InfluenceConfig, curv, patterns=()):
    """``[N, G]``: the rows of ``data`` against ``queries`` (in ``config``'s parts and grouping)."""
    queries = query_parts(tok, queries, config, patterns)
    order = grouping_order(model, units, batches(tok, queries), config)  # as cluster.scoring
    queries = queries if order is None else [queries[i] for i in order]
    feats = precondition_queries(model, units, batches(tok, queries), config, curv)
    return torch.cat([score_batch(model, units, b, feats, config) for b in data])


def quality(scores, labels) -> dict:
    s = scores.tolist()
    return {"auprc": auprc(s, labels), "recall_at_k": recall_at_k(s, labels)}


def recall_table(model, tok, corpus, queries, batch_sizes=(1,), patterns=()) -> list[dict]:
    labels = [r["planted"] for r in corpus.train]
    rows = []
    for method, sim in METHODS:
        for b in batch_sizes:
            cfg = InfluenceConfig(method=method, similarity=sim,
                                  query_batch_size=len(queries) if b == "all" else b)
            raw, fit_s, score_s = score(model, tok, corpus.train, queries, cfg,
                                        patterns=patterns)
            for how in ("max", "mean"):
                rows.append({"method": f"{method}" + (f"-{sim}" if method == "gradsim" else ""),
                             "B": b, "aggregate": how, **quality(aggregate(raw, how), labels),
                             "fit_s": fit_s, "score_s": score_s})
    for rank in (32, 8):  # low-rank queries (influence.query_rank) against full rank
        raw, fit_s, score_s = score(model, tok, corpus.train, queries,
                                    InfluenceConfig(query_rank=rank), patterns=patterns)
        for how in ("max", "mean"):
            rows.append({"method": f"linfac-rank{rank}", "B": 1, "aggregate": how,
                         **quality(aggregate(raw, how), labels), "fit_s": fit_s,
                         "score_s": score_s})
    rnd = random.Random(0)
    rows.append({"method": "random", "B": "-", "aggregate": "-",
                 **quality(torch.tensor([rnd.random() for _ in labels]), labels),
                 "fit_s": 0.0, "score_s": 0.0})
    return rows


def kronfluence_run(model, tok, corpus, queries, strategy: str, patterns=()) -> dict:
    """kronfluence's EK-FAC/KFAC on the same model (Conv1D → Linear) and data, B = 1, max."""
    raw, seconds = kronfluence_scores(model, tok, corpus, queries, strategy, patterns)
    labels = [r["planted"] for r in corpus.train]
    return {"method": f"kronfluence-{strategy}", "B": 1, "aggregate": "max",
            **quality(aggregate(raw, "max"), labels), "fit_s": seconds, "score_s": 0.0}


def kronfluence_scores(model, tok, corpus, queries, strategy: str, patterns=()):
    """(kronfluence's raw pairwise scores [N, Q] float64, wall seconds incl. its disk I/O); the
    queries in the product's default parts, as every other method gets them."""
    queries = query_parts(tok, queries, InfluenceConfig(), patterns)
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    names = [u.name for u in discover_units(model, "ekfac")]

    class LM(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return sequence_losses(model, batch, sampled=sample).sum()

        def compute_measurement(self, batch, model):
            return sequence_losses(model, batch).sum()

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

        def get_influence_tracked_modules(self):
            return names

    def dataset(rows):
        enc = [part_encoding(tok, encode(tok, r["prompt"], r["response"], 64), r) for r in rows]
        b = collate(enc, tok.pad_token_id)
        return [{k: v[i] for k, v in b.items() if k != "prompt_last"} for i in range(len(rows))]

    ref = prepare_model(_linear_copy(model), LM())
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        analyzer = Analyzer("bench", ref, LM(), cpu=True, disable_tqdm=True, output_dir=tmp,
                            log_level=logging.WARNING)
        analyzer.fit_all_factors("f", dataset(corpus.train), per_device_batch_size=32,
                                 factor_args=FactorArguments(strategy=strategy),
                                 overwrite_output_dir=True)
        analyzer.compute_pairwise_scores("s", "f", dataset(queries), dataset(corpus.train),
                                         per_device_query_batch_size=8,
                                         per_device_train_batch_size=32,
                                         score_args=ScoreArguments(), overwrite_output_dir=True)
        raw = analyzer.load_pairwise_scores("s")["all_modules"].T.double()
    return raw, time.perf_counter() - began



def _linear_copy(model):
    from operators.units import conv1d_as_linear
    return conv1d_as_linear(copy.deepcopy(model))
