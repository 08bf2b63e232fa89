"""What a user row's cells and column names may not be, beyond the format's own columns.

Pure checks that return the problem (``"column 'x': …"``) or None; ``cluster.dataio`` raises it
as a ``DataError`` naming the file and row in front.
"""

from __future__ import annotations

import re

TURNS = "prompt_turns"  # the same name as ``cluster.batches.TURNS``
# Columns the pipeline adds to the training rows (cluster.scoring: score, rank, inhibition, raw,
# n_tokens, via; cluster.selection_io: set; cluster.attribution: unit_shares): a user column of the
# same name would stand twice in the scores table, so ``data.train`` may not have one.
SCORED_COLUMNS = ("score", "rank", "set", "inhibition", "raw", "n_tokens", "unit_shares",
                  "unit_dependence", "via")
# JSON escapes of UTF-16 surrogates (\ud800-\udfff): valid in pairs, not valid text alone.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Kinds of cells one Parquet column cannot mix (ints and floats can: both become double).
KINDS = (("boolean", bool), ("number", (int, float)), ("text", (str, bytes)),
         ("list", (list, tuple)), ("object", dict))


def unicode_problem(item: dict) -> str | None:
    """A lone surrogate (JSON's ``"\\ud800"``) in any key or value: not text UTF-8 can hold."""
    for key, value in item.items():
        if not (_encodable(key) and _encodable(value)):
            name = key if _encodable(key) else ascii(key)[1:-1]
            return (f"column '{name}': not valid Unicode text (a lone UTF-16 surrogate escape "
                    "such as \\ud800)")
    return None


def _encodable(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_encodable(k) and _encodable(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_encodable(v) for v in value)
    return True


def reserved_problem(item: dict, reserved: tuple[str, ...]) -> str | None:
    """A column named as one LANCET writes itself (``prompt_turns``, or one of ``reserved``)."""
    for name in (TURNS, *reserved):
        if name in item:
            why = ("LANCET writes it from 'messages': give the conversation as 'messages'"
                   if name == TURNS else "the scores table adds a column of that name")
            return f"column '{name}': the name is reserved ({why}); rename the column"
    return None


def kind_of(value) -> str | None:
    """The kind of a cell (``KINDS``); None for null and for types left to Arrow."""
    for kind, types in KINDS:
        if isinstance(value, types):
            return kind
    return None


class ColumnKinds:
    """The kind of each column's first value, to refuse a later row of another kind (one
    Parquet type per column) naming both rows."""

    def __init__(self) -> None:
        self.first: dict[str, tuple[str, str]] = {}  # column -> (kind, where first seen)

    def problem(self, row: dict, where: str) -> str | None:
        for column, value in row.items():
            kind = kind_of(value)
            if kind is None:
                continue
            first = self.first.setdefault(column, (kind, where))
            if first[0] != kind:
                return (f"column '{column}': {kind} where earlier rows hold {first[0]} (first "
                        f"at {first[1]}): a column holds one type")
        return None
