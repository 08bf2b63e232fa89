"""Ray Data batches (dicts of numpy columns) → padded tensor batches for the operators."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from operators.sequences import collate, encode, sample_seed


@dataclass(frozen=True)
class TokenizeConfig:
    """How text becomes tokens (shared by every stage that reads samples)."""

    max_length: int = 256
    truncate: bool = True  # False: refuse sequences longer than max_length
    train_on_prompt: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.max_length) < 2:  # a prompt token and a response token at least
            raise ValueError(f"model.max_length={self.max_length}: must be >= 2")


def to_tensors(columns: dict[str, np.ndarray], tokenizer, config: TokenizeConfig,
               dtype_device: str = "cpu", response_column: str = "response"
               ) -> dict[str, torch.Tensor]:
    """Tokenize and collate one batch; rows carry their Fisher sampling seed (by id)."""
    ids = [str(x) for x in columns["id"]]
    encoded = [encode(tokenizer, str(p), str(r), config.max_length,
                      train_on_prompt=config.train_on_prompt, truncate=config.truncate)
               for p, r in zip(columns["prompt"], columns[response_column])]
    seeds = [sample_seed(i, str(config.seed)) for i in ids]
    batch = collate(encoded, tokenizer.pad_token_id, seeds)
    return {k: v.to(dtype_device) for k, v in batch.items()}


def rows_to_columns(rows: list[dict], keys=("id", "prompt", "response")) -> dict[str, np.ndarray]:
    return {k: np.array([r[k] for r in rows], dtype=object) for k in keys}


def iter_row_batches(rows: list[dict], size: int):
    for start in range(0, len(rows), size):
        yield rows_to_columns(rows[start:start + size])
