"""Batched greedy generation (issue #12): same tokens as one prompt at a time, never past the
model's positions."""

import logging

import pytest
import torch
from chat_tokenizer import chat_tokenizer
from tiny_models import tiny_model

from operators.chat import prompt_ids
from operators.generation import context_limit, greedy_generate

PROMPTS = ["hi there", "tell me a story once upon a time", "why", "what is red blue green",
           "one two three four five one two three four five please help"]


def one_at_a_time(model, tok, ids_list, max_new_tokens):
    """The old evaluation loop: one prompt, full forward per token, no KV cache."""
    out = []
    for ids in ids_list:
        new = []
        for _ in range(max_new_tokens):
            next_id = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if next_id == tok.eos_token_id:
                break
            new.append(next_id)
        out.append(tok.decode(new, skip_special_tokens=True).strip())
    return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("template", ["plain", "auto"])
def test_batched_greedy_equals_one_at_a_time(family, template):
    model, tok = tiny_model(family, seed=3, dtype=torch.float32), chat_tokenizer()
    ids = [prompt_ids(tok, p, template=template) for p in PROMPTS]
    expected = one_at_a_time(model, tok, ids, 12)
    got = greedy_generate(model, tok, PROMPTS, 12, template=template, batch_size=3)
    assert got == expected
    assert any(len(g.split()) > 3 for g in got)  # something was generated


def test_a_64_position_model_never_runs_past_its_positions(caplog):
    """prompt + max_new_tokens > 64 (and max_new_tokens > 64 alone): cut, warned, no IndexError."""
    model, tok = tiny_model("gpt2", dtype=torch.float32), chat_tokenizer()
    assert context_limit(model, 128) == 64
    long_prompt = " ".join(["one two three four five"] * 12)  # 60 words
    with caplog.at_level(logging.WARNING, logger="operators.generation"):
        texts = greedy_generate(model, tok, [long_prompt, "hi"], 24, context=128,
                                template="plain")
        many = greedy_generate(model, tok, ["hi there"], 100)
    assert len(texts) == 2 and len(many) == 1
    assert all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 63 for t in texts + many)
    assert "1 of 2 prompts exceed 40 tokens" in caplog.text
    assert "max_new_tokens=100 does not fit the model's 64 positions" in caplog.text
    # The cut keeps the prompt's end: the same continuation as the last 40 tokens alone.
    tail = tok.decode(prompt_ids(tok, long_prompt, template="plain")[-40:])
    assert greedy_generate(model, tok, [tail], 24, template="plain") == texts[:1]
