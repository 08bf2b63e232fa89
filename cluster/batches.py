"""Ray Data batches (dicts of numpy columns) → padded tensor batches for the operators."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from operators.chat import TEMPLATES, Turns
from operators.errors import UserError
from operators.query_parts import FIELDS as PART_FIELDS
from operators.query_parts import PART, part_encoding
from operators.sequences import Encoded, collate, encode, sample_seed

# The conversation before the response (a JSON list of {role, content}), written by
# ``cluster.dataio`` for rows given as ``messages``; absent or null: one user turn, ``prompt``.
TURNS = "prompt_turns"
TEXT_COLUMNS = ("id", "prompt", "response")


@dataclass(frozen=True)
class TokenizeConfig:
    """How text becomes tokens (shared by every stage that reads samples)."""

    max_length: int = 512  # = pipeline.config.USER_MAX_LENGTH (tests/test_defaults_agree.py)
    truncate: bool = True  # False: refuse sequences longer than max_length
    train_on_prompt: bool = False
    seed: int = 0
    # auto: the tokenizer's chat template when it has one; plain: raw prompt + " " + response.
    template: str = "auto"

    def __post_init__(self) -> None:
        if int(self.max_length) < 2:  # a prompt token and a response token at least
            raise UserError(f"model.max_length={self.max_length}: must be >= 2")
        if self.template not in TEMPLATES:
            raise UserError(f"data.template={self.template!r}: expected one of {TEMPLATES}")


def text_columns(names) -> list[str]:
    """The columns of ``names`` that tokenizing reads (``prompt_turns`` only where present)."""
    return [*TEXT_COLUMNS, *([TURNS] if TURNS in names else [])]


def turns_of(value) -> Turns | None:
    """A ``prompt_turns`` cell (JSON text, or null) → the turns, or None."""
    if value is None or (isinstance(value, float) and value != value) or value == "":
        return None
    return json.loads(value) if isinstance(value, str) else list(value)


def encode_row(tokenizer, config: TokenizeConfig, prompt, response, turns=None) -> Encoded:
    """One sample as every stage tokenizes it (``turns``: a ``prompt_turns`` cell)."""
    return encode(tokenizer, str(prompt), str(response), config.max_length,
                  train_on_prompt=config.train_on_prompt, truncate=config.truncate,
                  turns=turns_of(turns), template=config.template)

    def __post_init__(self) -> None:
        if int(self.max_length) < 2:  # a prompt token and a response token at least
            raise UserError(f"model.max_length={self.max_length}: must be >= 2")


def to_tensors(columns: dict[str, np.ndarray], tokenizer, config: TokenizeConfig,
               dtype_device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tokenize and collate one batch; rows carry their Fisher sampling seed (by id)."""
    ids = [str(x) for x in columns["id"]]
    turns = columns.get(TURNS, [None] * len(ids))
    encoded = [encode_row(tokenizer, config, p, r, t)
               for p, r, t in zip(columns["prompt"], columns["response"], turns)]
    if PART in columns:  # query parts (operators/query_parts.py): the loss on some tokens only
        encoded = [part_encoding(tokenizer, enc, _row(columns, i, ("response", *PART_FIELDS)))
                   for i, enc in enumerate(encoded)]
    seeds = [sample_seed(i, str(config.seed)) for i in ids]
    batch = collate(encoded, tokenizer.pad_token_id, seeds)
    return {k: v.to(dtype_device) for k, v in batch.items()}


def _row(columns: dict[str, np.ndarray], i: int, keys) -> dict:
    return {k: columns[k][i] for k in keys if k in columns}


def rows_to_columns(rows: list[dict], keys=("id", "prompt", "response")) -> dict[str, np.ndarray]:
    """Columns of ``rows``; ``prompt_turns`` and the query-part fields come along when any row
    has them."""
    keys = tuple(keys) + tuple(k for k in (TURNS, *PART_FIELDS)
                               if k not in keys and any(k in r for r in rows))
    return {k: np.array([r.get(k) for r in rows], dtype=object) for k in keys}


def iter_row_batches(rows: list[dict], size: int):
    for start in range(0, len(rows), size):
        yield rows_to_columns(rows[start:start + size])
