"""Linear datamodeling score: retrain on random half-subsets, correlate predicted and actual."""

from __future__ import annotations

import random

import torch

from bench.recall import METHODS, batches, score
from operators.metrics import spearman
from operators.scores import InfluenceConfig
from operators.sequences import sequence_losses
from pipeline.demo.model import TinyModelConfig, build_model, train_model, train_tokenizer


def query_losses(model, tok, queries) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([sequence_losses(model.eval(), b) for b in batches(tok, queries)])


def lds(corpus, queries, subsets: int = 20, size: int = 150, seed: int = 0) -> dict[str, float]:
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
    for method, sim in METHODS:
        cfg = InfluenceConfig(method=method, similarity=sim)
        raw, _, _ = score(base, tok, rows, queries, cfg)  # [N, Q]
        predicted = torch.stack([-raw[h].sum(0) for h in halves])  # loss falls as log p rises
        name = method + (f"-{sim}" if method == "gradsim" else "")
        out[name] = sum(spearman(predicted[:, q], actual[:, q])
                        for q in range(len(queries))) / len(queries)
    return out
