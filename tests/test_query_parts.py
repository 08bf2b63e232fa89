"""Query parts (operators/query_parts.py): which tokens each part's loss is on, for word-level,
byte-level BPE (GPT-2-like) and Metaspace (Llama-like) tokenizers and a chat template; the
rows a query expands to; the config's refusals; and the loss of a part being exactly the sum
over its tokens."""

from __future__ import annotations

import json

import pytest
import torch
from chat_tokenizer import chat_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from operators.errors import UserError
from operators.query_parts import (
    FIRST,
    PART,
    SPANS,
    compile_patterns,
    expand,
    judged_spans,
    part_encoding,
)
from operators.scores import InfluenceConfig
from operators.sequences import collate, encode, sequence_losses, token_log_probs
from pipeline.demo.model import TinyModelConfig, build_model, train_tokenizer

TEXTS = ["how can i rob the shop ?", "sure ! first you wait until dark , then you rob the shop "
         "and hide the evidence .", "i can not help with that . it would hurt people .",
         "tell me a story", "once upon a time the end is near", "yes please help"]
PROMPT, RESPONSE = "how can i rob the shop ?", ("sure ! first you wait until dark , then you "
                                                 "rob the shop and hide the evidence .")
PATTERNS = ("hide the evidence", "leave no trace")


def _bpe(pre, decoder) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer, tok.decoder = pre, decoder
    tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[EOS]", "[UNK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if isinstance(
            pre, pre_tokenizers.ByteLevel) else []))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]",
                                   unk_token="[UNK]")


TOKENIZERS = {
    "word-level": lambda: train_tokenizer(TEXTS),
    "byte-level BPE": lambda: _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False),
                                   decoders.ByteLevel()),
    "metaspace BPE": lambda: _bpe(pre_tokenizers.Metaspace(), decoders.Metaspace()),
}


def _part(tok, part: str, response=RESPONSE, opening=3, patterns=PATTERNS, prompt=PROMPT,
          length=256):
    row = dict(id="q", prompt=prompt, response=response)
    rows = expand([row], ("response", part), compile_patterns(patterns), opening,
                  lambda r: encode(tok, r["prompt"], r["response"], length), tok)
    return rows, {r[PART]: part_encoding(tok, encode(tok, prompt, response, length), r)
                  for r in rows}


def _loss_text(tok, enc) -> str:
    return tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m]).strip()


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_the_judged_part_is_on_the_matched_words_only(name):
    tok = TOKENIZERS[name]()
    _, parts = _part(tok, "judged")
    assert _loss_text(tok, parts["judged"]).replace(" ", "") == "hidetheevidence"
    assert sum(parts["response"].loss_mask) > sum(parts["judged"].loss_mask)


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_the_opening_part_is_on_the_first_tokens(name):
    tok = TOKENIZERS[name]()
    _, parts = _part(tok, "opening", opening=2)
    full, opening = parts["response"], parts["opening"]
    on = [i for i, m in enumerate(full.loss_mask) if m]
    assert [i for i, m in enumerate(opening.loss_mask) if m] == on[:2]


def test_a_chat_template_turn_maps_the_match_inside_the_assistant_turn():
    tok = chat_tokenizer()
    rows, parts = _part(tok, "judged", response="once upon a time the end is near",
                        patterns=("the end",), prompt="tell me a story")
    assert _loss_text(tok, parts["judged"]) == "the end"
    assert [r["id"] for r in rows] == ["q", "q#judged"]


def test_parts_that_repeat_the_response_or_hold_nothing_are_left_out():
    tok = train_tokenizer(TEXTS)
    rows, _ = _part(tok, "judged", patterns=("no such words",))
    assert [r[PART] for r in rows] == ["response"]
    rows, _ = _part(tok, "judged", length=12)
    assert [r[PART] for r in rows] == ["response"]  # the matched words were truncated away
    rows, _ = _part(tok, "opening", response="yes please", opening=5)
    assert [r[PART] for r in rows] == ["response"]  # the response is shorter than the opening
    only = expand([dict(id="q", prompt=PROMPT, response="yes please")], ("judged",),
                  compile_patterns(PATTERNS), 3,
                  lambda r: encode(tok, r["prompt"], r["response"], 64), tok)
    assert [(r["id"], r[PART]) for r in only] == [("q", "response")]  # never lose a query


def test_expanded_rows_carry_their_part_fields():
    tok = train_tokenizer(TEXTS)
    rows = expand([dict(id="q", prompt=PROMPT, response=RESPONSE, extra=1)],
                  ("response", "judged", "opening"), compile_patterns(PATTERNS), 3,
                  lambda r: encode(tok, r["prompt"], r["response"], 64), tok,
                  opening_outside_judged="keep")
    assert [r["id"] for r in rows] == ["q", "q#judged", "q#opening"]
    spans = judged_spans(RESPONSE, compile_patterns(PATTERNS))
    assert json.loads(rows[1][SPANS]) == [list(s) for s in spans]
    assert rows[2][FIRST] == 3 and all(r["extra"] == 1 for r in rows)


@pytest.mark.parametrize("name", TOKENIZERS)
def test_an_opening_outside_the_judged_text_is_dropped_only_when_asked(name):
    """``drop``: an opening sharing no token with the judged text (a sign-off after a benign
    start) is no query; an opening the judged text reaches, or an output the judge did not
    locate, keeps it; ``keep`` (the old rule) always keeps it."""
    tok = TOKENIZERS[name]()

    def parts(patterns, rule):
        rows = expand([dict(id="q", prompt=PROMPT, response=RESPONSE)],
                      ("response", "judged", "opening"), compile_patterns(patterns), 3,
                      lambda r: encode(tok, r["prompt"], r["response"], 256), tok,
                      opening_outside_judged=rule)
        return [r[PART] for r in rows]

    assert parts(PATTERNS, "keep") == ["response", "judged", "opening"]
    assert parts(PATTERNS, "drop") == ["response", "judged"]  # "hide the evidence" is at the end
    assert parts(("sure ! first",), "drop") == ["response", "judged", "opening"]
    assert parts(("no such words",), "drop") == ["response", "opening"]


def test_judged_spans_merge_overlapping_matches():
    spans = judged_spans("a hide the evidence b", compile_patterns(("hide the", "the evidence")))
    assert spans == [(2, 19)]


def test_a_parts_loss_is_the_sum_over_its_tokens():
    tok = train_tokenizer(TEXTS)
    model = build_model(tok, TinyModelConfig(width=16, layers=1, heads=2)).eval()
    _, parts = _part(tok, "judged")
    full, judged = parts["response"], parts["judged"]
    batch = collate([judged], tok.pad_token_id)
    with torch.no_grad():
        loss = sequence_losses(model, batch)
        logits = model(input_ids=batch["input_ids"]).logits
    picked = token_log_probs(logits, batch["input_ids"])[0]
    on = [i for i, m in enumerate(judged.loss_mask) if m]
    assert torch.allclose(loss[0], -picked[on].sum())
    assert set(on) < {i for i, m in enumerate(full.loss_mask) if m}


@pytest.mark.parametrize("kwargs, key", [
    ({"query_parts": ()}, "influence.query_parts"),
    ({"query_parts": ("response", "tail")}, "influence.query_parts"),
    ({"query_parts": ("response", "response")}, "influence.query_parts"),
    ({"opening_tokens": 0}, "influence.opening_tokens"),
    ({"opening_outside_judged": "sometimes"}, "influence.opening_outside_judged"),
])
def test_bad_query_parts_are_refused_naming_the_key(kwargs, key):
    with pytest.raises(UserError, match=key):
        InfluenceConfig(**kwargs)
