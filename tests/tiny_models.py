"""Tiny random-init causal LMs of each supported family, built locally (nothing is downloaded)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

VOCAB = 40


def tiny_config(family: str, width: int = 16, layers: int = 2, **extra):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    if family == "gpt2":
        return GPT2Config(n_embd=width, n_layer=layers, n_head=2, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    llama_like = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=64, **common)
    if family == "llama":
        return LlamaConfig(**llama_like)
    if family == "mistral":
        return MistralConfig(**llama_like)
    if family == "qwen2":
        return Qwen2Config(**llama_like)
    if family == "opt":
        return OPTConfig(hidden_size=width, ffn_dim=2 * width, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=64,
                         word_embed_proj_dim=width, dropout=0.0, attention_dropout=0.0, **common)
    if family == "neox":
        return GPTNeoXConfig(hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=layers, num_attention_heads=2,
                             max_position_embeddings=64, hidden_dropout=0.0,
                             attention_dropout=0.0, **common)
    raise ValueError(family)


FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "opt", "neox")


def tiny_model(family: str = "gpt2", seed: int = 0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw),
                                             attn_implementation="eager")
    return model.to(dtype).eval()


def random_batch(batch: int = 4, length: int = 10, seed: int = 0, ragged: bool = True):
    """A right-padded batch with a prompt/response split and a response-only loss mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    lengths = [length - (i % 3 if ragged else 0) for i in range(batch)]
    attention = torch.zeros(batch, length, dtype=torch.long)
    loss = torch.zeros(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths):
        attention[row, :n] = 1
        loss[row, 3:n] = 1
        ids[row, n:] = 0
    prompt_last = torch.full((batch,), 2)
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss,
            "prompt_last": prompt_last}


def slice_batch(batch: dict, rows) -> dict:
    """Rows of a batch, trimmed to their longest real length."""
    out = {k: v[rows] for k, v in batch.items()}
    n = int(out["attention_mask"].sum(dim=1).max())
    return {k: (v[:, :n] if v.dim() == 2 else v) for k, v in out.items()}


from operators.units import conv1d_as_linear as conv1d_to_linear  # noqa: E402,F401
