"""``prepare``: validated, normalised inputs (or the embedded demo built from nothing).

Writes ``train.parquet``, ``queries.parquet``, ``eval.parquet`` (prompts, ``split`` seen/unseen),
``clean_eval.parquet`` (optional) and ``info.json`` (the model directory, ground-truth column,
token statistics). The demo also writes ``model/``: a tokenizer and a tiny GPT-2 trained here.

Besides the rows' own checks (``cluster/dataio.py``), the user's data is refused here, naming
the file, row and column, when the label column holds anything but booleans (or 0/1), an eval
``split`` is not seen/unseen, the chat template fails on a row, or a query keeps no response
token within ``model.max_length`` (a few: a warning).
"""

from __future__ import annotations

import json
from functools import partial

from cluster.batches import TURNS, encode_row, turns_of
from cluster.cells import SCORED_COLUMNS
from cluster.dataio import DataError, iter_located, write_parquet_atomic
from cluster.model_io import check_model_dir, load_model, load_tokenizer
from operators.chat import ChatTemplateError, prompt_ids
from operators.errors import UserError
from operators.generation import greedy_generate
from operators.sequences import Encoded, SequenceTooLongError
from pipeline import specs
from pipeline.artifacts import Prepared
from pipeline.config import LancetConf
from pipeline.dag import StageContext
from pipeline.demo.corpus import build_corpus
from pipeline.demo.model import train_demo_model
from pipeline.judge import Judge, judge_config
from pipeline.specs import tokenize

# A query keeping fewer response tokens than this (cut at model.max_length) is warned about: its
# influence rests on those few tokens.
FEW_RESPONSE_TOKENS = 4
SPLITS = ("seen", "unseen")  # data.eval's ``split``; absent or null: seen (pipeline.evaluation)


def run(ctx: StageContext) -> dict:
    cfg = ctx.cfg
    if cfg.data.train:
        return _bring_your_own(cfg, ctx.output(), ctx.log)
    return _demo(cfg, ctx.output(), ctx.log)


def _bring_your_own(cfg: LancetConf, out: Prepared, log) -> dict:
    """Validate and write the user's data; the corpus streams through (never held whole)."""
    if not cfg.model.path:
        raise UserError("model.path is empty: give your model directory with data.train")
    check_model_dir(cfg.model.path)
    if not cfg.data.queries:
        raise DataError("data.queries is empty: give the undesirable outputs observed")
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    stats = {"rows": 0, "tokens": 0, "truncated": 0}
    label = cfg.data.label_column
    train = iter_located(cfg.data.train, cfg.data.format, "data.train", reserved=SCORED_COLUMNS,
                         check=partial(_label_problem, label=label) if label else None)
    write_parquet_atomic(_checked(train, tokenizer, cfg, stats), out.train,
                         source=f"data.train={cfg.data.train}")
    queries = list(iter_located(cfg.data.queries, cfg.data.format, "data.queries"))
    stats["queries_truncated"] = _check_queries(queries, tokenizer, cfg, log)
    evals = (list(iter_located(cfg.data.eval, cfg.data.format, "data.eval",
                               require_response=False, check=_split_problem))
             if cfg.data.eval else [])
    _check_prompts(evals, tokenizer, cfg)
    clean = list(iter_located(cfg.data.clean_eval, "prompt_response", "data.clean_eval")) \
        if cfg.data.clean_eval else []
    _check_prompts(clean, tokenizer, cfg)
    return _write(out, cfg.model.path, None, _rows(queries), _rows(evals), _rows(clean), label,
                  stats)


def _rows(located: list[tuple[str, dict]]) -> list[dict]:
    return [row for _, row in located]


def _encoded(where: str, row: dict, tokenizer, cfg: LancetConf) -> Encoded:
    """The row as every stage tokenizes it; a failure names the row."""
    try:
        return encode_row(tokenizer, tokenize(cfg), row["prompt"], row["response"],
                          row.get(TURNS))
    except SequenceTooLongError as err:
        raise DataError(f"{where}: {err} (model.max_length={tokenize(cfg).max_length}; set "
                        "model.truncate=true to cut)") from err
    except ChatTemplateError as err:
        raise DataError(f"{where}: {err}") from err


def _checked(located, tokenizer, cfg: LancetConf, stats: dict):
    """Pass rows through, refusing one too long (unless truncating) and counting tokens."""
    for where, row in located:
        enc = _encoded(where, row, tokenizer, cfg)
        stats["rows"] += 1
        stats["truncated"] += enc.truncated
        stats["tokens"] += len(enc.input_ids)
        yield row


def _label_problem(row: dict, label: str) -> str | None:
    """The ground truth is read as ``bool(value)``: "no" would count as contaminated."""
    if label not in row:
        return (f"column '{label}': missing (data.label_column names it; found columns: "
                f"{', '.join(sorted(row))})")
    value = row[label]
    if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
        return None
    got = "null" if value is None else f"{type(value).__name__} {value!r}"
    return (f"column '{label}': expected a boolean (true/false or 0/1) for data.label_column, "
            f"got {got}")


def _split_problem(row: dict) -> str | None:
    """An eval row's ``split`` (a misspelt one would leave the row out of every rate)."""
    split = row.get("split")
    if split is None or split in SPLITS:
        return None
    return (f"column 'split': {split!r} is not one of {', '.join(SPLITS)} (leave it out or "
            "null for seen)")


def _check_queries(located: list[tuple[str, dict]], tokenizer, cfg: LancetConf, log) -> int:
    """How many queries were cut at model.max_length; a warning when a cut query keeps only a
    few response tokens, an error when it keeps none (its gradient would be empty)."""
    cut, short, length = 0, [], tokenize(cfg).max_length
    for where, row in located:
        enc = _encoded(where, row, tokenizer, cfg)
        kept = len(enc.input_ids) - enc.prompt_len
        if kept < 1:
            raise DataError(f"{where}: the prompt fills model.max_length={length}: no response "
                            "token is left for the query")
        cut += enc.truncated
        if enc.truncated and kept < FEW_RESPONSE_TOKENS:
            short.append(where)
    if short:
        log(f"warning: {len(short)} of {len(located)} queries keep fewer than "
            f"{FEW_RESPONSE_TOKENS} response tokens within model.max_length={length} (first: "
            f"{short[0]}): shorten their prompts or raise model.max_length")
    return cut


def _check_prompts(located: list[tuple[str, dict]], tokenizer, cfg: LancetConf) -> None:
    """Each prompt renders with the chat template, as generation will render it."""
    for where, row in located:
        try:
            prompt_ids(tokenizer, row["prompt"], turns=turns_of(row.get(TURNS)),
                       template=cfg.data.template)
        except ChatTemplateError as err:
            raise DataError(f"{where}: {err}") from err


def _check_lengths(rows: list[dict], tokenizer, cfg: LancetConf, key: str) -> dict:
    stats = {"rows": 0, "tokens": 0, "truncated": 0}
    located = ((f"{key}, row {number}", row) for number, row in enumerate(rows))
    for _ in _checked(located, tokenizer, cfg, stats):
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
            "data/truncated": stats["truncated"], "data/queries": len(queries),
            "data/queries_truncated": stats.get("queries_truncated", 0)}

