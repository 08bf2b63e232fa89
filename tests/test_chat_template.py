"""Chat templates (issue #13): one format for fitting, scoring, IBO, evaluation and generation."""

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chat_tokenizer import chat_tokenizer

from cluster.batches import TURNS, TokenizeConfig, encode_row, rows_to_columns, to_tensors
from cluster.dataio import DataError, read_rows
from cluster.ibo_objectives import side
from cluster.selection_io import write_selection
from operators.chat import prompt_ids
from operators.selection import SelectionConfig
from operators.sequences import encode

TOKENS = TokenizeConfig(max_length=64)
CHAT = [{"role": "system", "content": "please help"},
        {"role": "user", "content": "tell me a story"},
        {"role": "assistant", "content": "once upon a time"},
        {"role": "user", "content": "why"}]


def tokens(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_loss_mask_covers_exactly_the_assistant_turn():
    tok = chat_tokenizer()
    enc = encode(tok, "hi there", "fine thanks", 64)
    assert tokens(tok, enc.input_ids) == ["<s>", "<|user|>", "hi", "there", "<|end|>",
                                          "<|assistant|>", "fine", "thanks", "<|end|>"]
    assert [t for t, m in zip(tokens(tok, enc.input_ids), enc.loss_mask) if m] == [
        "fine", "thanks", "<|end|>"]
    assert enc.input_ids[:enc.prompt_len] == prompt_ids(tok, "hi there")


def test_plain_keeps_todays_encoding():
    """``plain``, or no template: prompt, " " + response, EOS, no BOS (as before #13)."""
    for tok, template in ((chat_tokenizer(), "plain"), (chat_tokenizer(template=None), "auto")):
        enc = encode(tok, "hi there", "fine thanks", 64, template=template)
        old = (tok("hi there", add_special_tokens=False)["input_ids"]
               + tok(" fine thanks", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        assert enc.input_ids == old and enc.prompt_len == 2
        assert enc.loss_mask == [0, 0, 1, 1, 1]


def test_bos_as_the_tokenizer_adds_it_never_twice():
    tok = chat_tokenizer(adds_bos=True)
    plain = encode(tok, "hi there", "fine", 64, template="plain")
    assert tokens(tok, plain.input_ids) == ["<s>", "hi", "there", "fine", "</s>"]
    chat = encode(tok, "hi there", "fine", 64)
    assert tokens(tok, chat.input_ids).count("<s>") == 1 and chat.input_ids[0] == 1
    no_bos_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok = chat_tokenizer(template=no_bos_template, adds_bos=True)
    assert tokens(tok, encode(tok, "hi", "fine", 64).input_ids)[:2] == ["<s>", "hi"]


def test_template_breaking_the_token_prefix_falls_back_to_the_text_difference():
    # No space after the generation prompt: "<|assistant|>fine" is one (unknown) word when the
    # whole turn is tokenized, so the prompt's ids are not a prefix of the full ids.
    glued = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = chat_tokenizer(template=glued.replace("{{ m['content'] }} {% endfor %}",
                                                "{% if m['role'] == 'assistant' %}<|assistant|>"
                                                "{% endif %}{{ m['content'] }} {% endfor %}"))
    enc = encode(tok, "hi there", "fine thanks", 64)
    masked = [t for t, m in zip(tokens(tok, enc.input_ids), enc.loss_mask) if m]
    assert masked == ["fine", "thanks"]
    assert tokens(tok, enc.input_ids[:enc.prompt_len]) == ["<s>", "hi", "there", "<|assistant|>"]


def test_prior_turns_are_rendered_and_truncation_keeps_bos_and_the_prompt_end():
    tok = chat_tokenizer()
    enc = encode(tok, "flattened", "the end", 64, turns=CHAT)
    text = tokens(tok, enc.input_ids)
    assert text[:3] == ["<s>", "<|system|>", "please"] and text.count("<s>") == 1
    assert text[enc.prompt_len - 3:enc.prompt_len] == ["why", "<|end|>", "<|assistant|>"]
    assert "flattened" not in text
    # A prompt longer than the context keeps BOS, its end and one response token.
    short = encode(tok, "flattened", "the end", 6, turns=CHAT)
    assert tokens(tok, short.input_ids) == ["<s>", "<|user|>", "why", "<|end|>",
                                            "<|assistant|>", "the"]
    assert short.truncated and short.loss_mask == [0, 0, 0, 0, 0, 1]


def test_every_stage_tokenizes_a_row_the_same_way():
    """Fitting/scoring (``to_tensors``), IBO (``side`` → ``to_tensors``), prepare's check
    (``encode_row``) and generation (``prompt_ids``) give one set of ids per row."""
    tok = chat_tokenizer()
    rows = [{"id": "a", "prompt": "hi there", "response": "fine thanks"},
            {"id": "b", "prompt": "flat", "response": "the end", TURNS: json.dumps(CHAT)}]
    fit = to_tensors(rows_to_columns(rows), tok, TOKENS)
    pairs = [{f"{p}{k}": v for p in ("pos_", "neg_") for k, v in r.items()} for r in rows]
    ibo = to_tensors(side(pairs, "pos_"), tok, TOKENS)
    assert fit["input_ids"].tolist() == ibo["input_ids"].tolist()
    assert fit["loss_mask"].tolist() == ibo["loss_mask"].tolist()
    for i, row in enumerate(rows):
        enc = encode_row(tok, TOKENS, row["prompt"], row["response"], row.get(TURNS))
        n = len(enc.input_ids)
        assert fit["input_ids"][i, :n].tolist() == enc.input_ids
        turns = json.loads(row[TURNS]) if TURNS in row else None
        assert prompt_ids(tok, row["prompt"], turns=turns) == enc.input_ids[:enc.prompt_len]


def test_selection_carries_prompt_turns_into_the_ibo_datasets(tmp_path):
    rows = [{"id": str(i), "prompt": "p", "response": "r", "score": float(s), "rank": i + 1,
             TURNS: json.dumps(CHAT) if i % 2 else None}
            for i, s in enumerate([5, 4, 0.2, 0.1, 0.0, -0.1, -3, -4])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ranked.parquet")
    write_selection(tmp_path / "ranked.parquet", SelectionConfig(alpha=0.5),
                    tmp_path / "scores", tmp_path / "select")
    pairs = pq.read_table(tmp_path / "select" / "pairs.parquet").to_pylist()
    assert pairs and {"pos_prompt_turns", "neg_prompt_turns"} <= set(pairs[0])
    by_id = {r["id"]: r[TURNS] for r in rows}
    assert all(p["pos_prompt_turns"] == by_id[p["pos_id"]] for p in pairs)
    cols = side(pairs, "neg_")
    assert list(cols[TURNS]) == [by_id[i] for i in cols["id"]]


def test_messages_rows_become_prompt_response_and_turns(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"messages": CHAT + [{"role": "assistant", "content": "the end"}], "topic": "x"},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "fine"}], "topic": "y"}]) + "\n")
    rows = read_rows(str(path))
    assert rows[0]["response"] == "the end" and json.loads(rows[0][TURNS]) == CHAT
    assert rows[0]["prompt"].endswith("user: why") and rows[0]["topic"] == "x"
    assert rows[1]["prompt"] == "hi" and "messages" not in rows[1]
    pq.write_table(pa.Table.from_pylist([{"messages": CHAT}]), tmp_path / "eval.parquet")
    evals = read_rows(str(tmp_path / "eval.parquet"), require_response=False)
    assert evals[0]["response"] is None and json.loads(evals[0][TURNS]) == CHAT


@pytest.mark.parametrize("messages, needle", [
    ("hello", "non-empty list"),
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}], "last turn must be the assistant"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "turn 0"),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}], "turn 0"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], "turn 1"),
    ([{"role": "assistant", "content": "x"}], "no user turn"),
])
def test_bad_messages_are_refused_naming_file_row_and_column(tmp_path, messages, needle):
    path = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError) as err:
        read_rows(str(path))
    assert str(path) in str(err.value) and "line 2" in str(err.value)
    assert "column 'messages'" in str(err.value) and needle in str(err.value)


def test_template_values_are_checked_naming_the_key():
    from pipeline.config import LancetConf
    from pipeline.specs import validate
    cfg = LancetConf()
    cfg.data.template = "chatml"
    with pytest.raises(ValueError, match="data.template='chatml'"):
        validate(cfg)
    with pytest.raises(ValueError, match="data.template"):
        encode(chat_tokenizer(), "hi", "fine", 8, template="jinja")
    assert np.array_equal(TokenizeConfig().template, "auto")


def test_hh_rlhf_dialogues_become_turns_for_the_template(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: fine\n\nHuman: why"
                                          "\n\nAssistant: yes", "rejected": "x"}) + "\n")
    row = read_rows(str(path), "hh_rlhf")[0]
    assert json.loads(row[TURNS]) == [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "fine"},
                                      {"role": "user", "content": "why"}]
    tok = chat_tokenizer()
    enc = encode_row(tok, TOKENS, row["prompt"], row["response"], row[TURNS])
    assert tokens(tok, enc.input_ids)[enc.prompt_len:] == ["yes", "<|end|>"]
    plain = encode_row(tok, replace(TOKENS, template="plain"), row["prompt"], row["response"],
                       row[TURNS])
    assert plain.input_ids == encode(tok, row["prompt"], "yes", 64, template="plain").input_ids
