"""The demo's tokenizer and tiny GPT-2, trained from scratch on the CPU (nothing downloaded)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from operators.errors import UserError
from operators.sequences import collate, encode, sequence_losses

SPECIAL = {"pad_token": "[PAD]", "eos_token": "[EOS]", "unk_token": "[UNK]",
           "bos_token": "[EOS]"}


@dataclass(frozen=True)
class TinyModelConfig:
    """Shape and training of the demo model."""

    width: int = 64
    layers: int = 2
    heads: int = 4
    context: int = 64
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("width", "layers", "heads", "epochs", "batch_size"):
            if int(getattr(self, key)) < 1:
                raise UserError(f"demo.{key}={getattr(self, key)}: must be >= 1")
        if self.width % self.heads:
            raise UserError(f"demo.width={self.width}: must be a multiple of demo.heads")
        if not self.lr > 0:
            raise UserError(f"demo.lr={self.lr}: must be > 0")


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the given texts."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"])
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)


def build_model(tokenizer, config: TinyModelConfig) -> GPT2LMHeadModel:
    torch.manual_seed(config.seed)
    gpt = GPT2Config(vocab_size=len(tokenizer), n_positions=config.context, n_embd=config.width,
                     n_layer=config.layers, n_head=config.heads,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    return GPT2LMHeadModel(gpt)


def train_model(model, tokenizer, rows: list[dict], config: TinyModelConfig) -> list[float]:
    """Plain next-token training on the responses; returns the loss per epoch."""
    encoded = [encode(tokenizer, r["prompt"], r["response"], config.context) for r in rows]
    rng = random.Random(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    model.train()
    history = []
    for _ in range(config.epochs):
        rng.shuffle(encoded)
        total = 0.0
        for start in range(0, len(encoded), config.batch_size):
            batch = collate(encoded[start:start + config.batch_size], tokenizer.pad_token_id)
            loss = sequence_losses(model, batch).sum() / batch["loss_mask"].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        history.append(total)
    return history.__class__(h / max(1, -(-len(encoded) // config.batch_size)) for h in history)


def train_demo_model(rows: list[dict], extra_texts: list[str], config: TinyModelConfig):
    """Tokenizer + model trained on ``rows``; ``extra_texts`` only widen the vocabulary."""
    texts = [r["prompt"] + " " + r["response"] for r in rows] + extra_texts
    tokenizer = train_tokenizer(texts)
    model = build_model(tokenizer, config)
    train_model(model, tokenizer, rows, config)
    return model.eval(), tokenizer
