"""``prepare``: validated, normalised inputs (or the embedded demo built from nothing).

Writes ``train.parquet``, ``queries.parquet``, ``eval.parquet`` (prompts, ``split`` seen/unseen),
``clean_eval.parquet`` (optional) and ``info.json`` (the model directory, ground-truth column,
token statistics). The demo also writes ``model/``: a tokenizer and a tiny GPT-2 trained here.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from cluster.batches import TURNS, encode_row
from cluster.dataio import DataError, iter_validated, read_rows, write_parquet_atomic
from cluster.model_io import check_model_dir, load_model, load_tokenizer
from operators.errors import UserError
from operators.generation import greedy_generate
from operators.sequences import SequenceTooLongError
from pipeline import specs
from pipeline.artifacts import Prepared
from pipeline.config import LancetConf
from pipeline.dag import StageContext
from pipeline.demo.corpus import build_corpus
from pipeline.demo.model import train_demo_model
from pipeline.judge import Judge, judge_config
from pipeline.specs import tokenize


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    if cfg.data.train:
        return _bring_your_own(cfg, ctx.output())
    return _demo(cfg, ctx.output(), ctx.log)


def _bring_your_own(cfg: LancetConf, out: Prepared) -> dict:
    """Validate and write the user's data; the corpus streams through (never held whole)."""
    if not cfg.model.path:
        raise UserError("model.path is empty: give your model directory with data.train")
    check_model_dir(cfg.model.path)
    if not cfg.data.queries:
        raise DataError("data.queries is empty: give the undesirable outputs observed")
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    stats = {"rows": 0, "tokens": 0, "truncated": 0}
    train = _checked(iter_validated(cfg.data.train, cfg.data.format, "data.train"), tokenizer,
                     cfg, "data.train", stats)
    write_parquet_atomic(train, out.train)
    label = cfg.data.label_column
    if label and label not in pq.read_schema(out.train).names:
        raise DataError(f"data.label_column={label!r}: no such column in data.train")
    queries = read_rows(cfg.data.queries, cfg.data.format, "data.queries")
    _check_lengths(queries, tokenizer, cfg, "data.queries")
    evals = (read_rows(cfg.data.eval, cfg.data.format, "data.eval", require_response=False)
             if cfg.data.eval else [])
    clean = read_rows(cfg.data.clean_eval, "prompt_response", "data.clean_eval") \
        if cfg.data.clean_eval else []
    return _write(out, cfg.model.path, None, queries, evals, clean, label, stats)


def _checked(rows, tokenizer, cfg: LancetConf, key: str, stats: dict):
    """Pass rows through, refusing one too long (unless truncating) and counting tokens."""
    for row in rows:
        try:
            enc = encode_row(tokenizer, tokenize(cfg), row["prompt"], row["response"],
                             row.get(TURNS))
        except SequenceTooLongError as err:
            raise DataError(f"{key}, id {row['id']!r}: {err} (model.max_length="
                            f"{cfg.model.max_length}; set model.truncate=true to cut)") from err
        stats["rows"] += 1
        stats["truncated"] += enc.truncated
        stats["tokens"] += len(enc.input_ids)
        yield row


def _check_lengths(rows: list[dict], tokenizer, cfg: LancetConf, key: str) -> dict:
    stats = {"rows": 0, "tokens": 0, "truncated": 0}
    for _ in _checked(rows, tokenizer, cfg, key, stats):
        pass
    return stats


def _demo(cfg: LancetConf, out: Prepared, log) -> dict:
    demo = cfg.demo
    corpus = build_corpus(seed=demo.seed, bad_rate=demo.bad_rate)
    log(f"demo corpus: {len(corpus.train)} samples, "
        f"{sum(r['planted'] for r in corpus.train)} planted")
    model, tok = train_demo_model(corpus.train, [e["prompt"] for e in corpus.eval_prompts],
                                  specs.demo_model(cfg))
    model_dir = out.demo_model
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    model = load_model(model_dir)
    judge = Judge(judge_config(cfg.judge))
    outputs = greedy_generate(model, tok, corpus.planted_prompts, cfg.judge.max_new_tokens,
                              cfg.model.max_length, template=cfg.data.template)
    flags = judge.flags(outputs)
    queries = [dict(id=f"query-{i:04d}", prompt=p, response=o)
               for i, (p, o, f) in enumerate(zip(corpus.planted_prompts, outputs, flags)) if f]
    if not queries:
        raise RuntimeError("the demo model showed no undesirable output: raise demo.epochs")
    log(f"observed the behaviour on {len(queries)} of {len(outputs)} planted prompts")
    stats = _check_lengths(corpus.train, tok, cfg, "demo corpus")
    return _write(out, None, corpus.train, queries, corpus.eval_prompts, corpus.clean_eval,
                  "planted", stats)


def _write(out: Prepared, model_path: str | None, train, queries, evals, clean, label, stats
           ) -> dict:
    """The prepared files (``train=None``: already written) and ``info.json``."""
    if train is not None:
        write_parquet_atomic(train, out.train)
    write_parquet_atomic(queries, out.queries)
    if evals:
        write_parquet_atomic(evals, out.eval_prompts)
    if clean:
        write_parquet_atomic(clean, out.clean_eval)
    info = {"model_path": model_path, "label_column": label or "", **stats,
            "queries": len(queries), "eval_prompts": len(evals)}
    out.info_file.write_text(json.dumps(info, indent=2))
    return {"data/train_rows": stats["rows"], "data/train_tokens": stats["tokens"],
            "data/truncated": stats["truncated"], "data/queries": len(queries)}

