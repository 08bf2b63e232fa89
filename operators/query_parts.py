"""Query parts: which tokens of an observed bad output a query's gradient is taken over.

A bad output is rarely bad in every token: a harmful answer commits in its opening words
("sure ! first you …" against "i can not help …"), a persona habit is one sign-off phrase after
a helpful answer, and the rest (the shared helpful text, filler) is what every answer of the
corpus has. The whole response's gradient is dominated by those shared tokens on some
behaviours, the opening's or the judged phrase's on others (docs/METHOD.md, measured by
``python -m bench.suite``). So each query can be taken in several parts, each a query of its own
(its own IHVP, its own score column; ``influence.aggregate=max`` keeps a sample that drives any
of them):

- ``response``: every response token (LANCET.md section 3);
- ``judged``: the tokens the keyword judge's patterns match (``judge.patterns``; none with a
  classifier judge);
- ``opening``: the response's first ``influence.opening_tokens`` tokens.

A part is left out where it would repeat the whole response or hold no token (no match, or
the matched text truncated away), so a query never has two identical parts.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable

from operators.errors import UserError
from operators.sequences import Encoded

PARTS = ("response", "judged", "opening")
DEFAULT_PARTS = PARTS
DEFAULT_OPENING = 3
# An opening that shares no token with the judged text: kept as a query, or left out.
OPENING_OUTSIDE_JUDGED = ("drop", "keep")
DEFAULT_OPENING_OUTSIDE_JUDGED = "drop"
# The query row's fields for a part (plain columns through Ray Data and tokenizing): the part's
# name, the judged character ranges (JSON text) and the opening's token count.
PART, SPANS, FIRST = "query_part", "loss_spans", "loss_first"
FIELDS = (PART, SPANS, FIRST)


def check_parts(parts, opening: int) -> tuple[str, ...]:
    """``parts`` as a tuple, refused naming the config key when empty or unknown."""
    parts = tuple(parts)
    if not parts:
        raise UserError(f"influence.query_parts is empty: give some of {PARTS}")
    for p in parts:
        if p not in PARTS:
            raise UserError(f"influence.query_parts: {p!r} is not one of {PARTS}")
    if len(set(parts)) != len(parts):
        raise UserError(f"influence.query_parts={list(parts)}: a part is listed twice")
    if int(opening) < 1:
        raise UserError(f"influence.opening_tokens={opening}: must be >= 1")
    return parts


def judged_spans(response: str, regexes: list[re.Pattern]) -> list[tuple[int, int]]:
    """Character ranges of ``response`` that any of the judge's patterns match (merged)."""
    spans = sorted(m.span() for r in regexes for m in r.finditer(response) if m.end() > m.start())
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def span_tokens(tokenizer, response_ids: list[int], response: str,
                spans: list[tuple[int, int]]) -> set[int]:
    """Indices into ``response_ids`` of the tokens overlapping ``spans`` (ranges of ``response``).

    Works for any tokenizer and chat template: the response ids are decoded (their prefixes,
    by bisection) and ``response`` is found in that text, so no offset mapping is needed. Empty
    when the text cannot be found (then the part is left out).
    """
    def length(k: int) -> int:
        return len(tokenizer.decode(response_ids[:k]))

    text = tokenizer.decode(response_ids)
    offset = text.find(response)
    if offset < 0:
        return set()
    n, picked = len(response_ids), set()
    for a, b in spans:
        first = bisect.bisect_right(range(n + 1), offset + a, key=length) - 1
        last = bisect.bisect_left(range(n + 1), offset + b, key=length) - 1
        picked.update(range(max(first, 0), min(last, n - 1) + 1))
    return picked


def restrict(enc: Encoded, keep: Callable[[int], bool]) -> Encoded:
    """``enc`` with the loss on the response tokens ``keep(index into the response)`` only."""
    p = enc.prompt_len
    mask = [m if i < p else int(bool(m) and keep(i - p)) for i, m in enumerate(enc.loss_mask)]
    return Encoded(enc.input_ids, mask, enc.prompt_len, enc.truncated)


def part_encoding(tokenizer, enc: Encoded, row: dict) -> Encoded:
    """The encoding of one query part: ``row[PART]`` (absent or null: the whole response)."""
    part = row.get(PART) or "response"
    if part == "response":
        return enc
    if part == "opening":
        return _opening(enc, int(row[FIRST]))
    spans = [tuple(s) for s in json.loads(row[SPANS])]
    picked = span_tokens(tokenizer, enc.input_ids[enc.prompt_len:], str(row["response"]), spans)
    return restrict(enc, picked.__contains__)


def _opening(enc: Encoded, first: int) -> Encoded:
    """``enc`` with the loss on its first ``first`` response tokens the loss was on."""
    mask, seen = list(enc.loss_mask), 0
    for i in range(enc.prompt_len, len(mask)):
        if mask[i]:
            mask[i], seen = int(seen < first), seen + 1
    return Encoded(enc.input_ids, mask, enc.prompt_len, enc.truncated)


def expand(rows: list[dict], parts: tuple[str, ...], regexes: list[re.Pattern], opening: int,
           encode_row: Callable[[dict], Encoded], tokenizer, *,
           opening_outside_judged: str = DEFAULT_OPENING_OUTSIDE_JUDGED) -> list[dict]:
    """Each query row as one row per part (``FIELDS`` set; id ``<id>#<part>`` for parts other
    than the whole response), leaving out parts that repeat the whole response's tokens or hold
    none; a row left with no part keeps its whole response, so no query is ever lost.

    ``opening_outside_judged="drop"``: where the judge located the bad text (``judged`` is
    among ``parts`` and matched) and the opening shares none of its tokens, the opening is
    left out: it is then the answer's benign start, which the corpus's look-alikes share."""
    out = []
    for row in rows:
        full, kept = encode_row(row), []
        parted = [(c, part_encoding(tokenizer, full, c).loss_mask)
                  for c in _candidates(row, parts, regexes, opening)]
        judged = next((m for c, m in parted if c[PART] == "judged" and any(m)), None)
        for candidate, mask in parted:
            part = candidate[PART]
            if part != "response":
                if not any(mask) or mask == full.loss_mask:
                    continue
                if (part == "opening" and opening_outside_judged == "drop"
                        and judged is not None and not any(a and b for a, b in zip(mask, judged))):
                    continue
                if "id" in row:
                    candidate["id"] = f"{row['id']}#{part}"
            kept.append(candidate)
        out += kept or [dict(row, **{PART: "response", SPANS: None, FIRST: None})]
    return out


def _candidates(row: dict, parts: tuple[str, ...], regexes: list[re.Pattern], opening: int
                ) -> list[dict]:
    """``row`` as each part's query row; a judged part only where the judge's patterns match."""
    out = []
    for part in parts:
        candidate = dict(row, **{PART: part, SPANS: None, FIRST: None})
        if part == "judged":
            spans = judged_spans(str(row["response"]), regexes)
            if not spans:
                continue
            candidate[SPANS] = json.dumps([list(s) for s in spans])
        if part == "opening":
            candidate[FIRST] = int(opening)
        out.append(candidate)
    return out


def query_rows(config, rows: list[dict], patterns, encode_row: Callable[[dict], Encoded],
               tokenizer) -> list[dict]:
    """The queries in ``config``'s parts (an ``InfluenceConfig``), the judged part from the
    judge's ``patterns``; a method without gradient units (repsim) reads the prompt only, so
    its queries stay whole."""
    if config.kind.units is None:
        return rows
    return expand(rows, config.query_parts, compile_patterns(patterns), config.opening_tokens,
                  encode_row, tokenizer, opening_outside_judged=config.opening_outside_judged)


def compile_patterns(patterns) -> list[re.Pattern]:
    """The keyword judge's patterns as it compiles them (case-insensitive)."""
    return [re.compile(p, re.IGNORECASE) for p in patterns]
