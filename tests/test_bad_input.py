"""Bad input is refused with an error naming the file, the row and the field (or the key)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_models import tiny_model

from cluster.dataio import DataError, read_rows
from cluster.model_io import ModelLoadError, check_model_dir, load_model, load_tokenizer
from operators.units import UnsupportedModelError, discover_units

GOOD = [{"id": "a", "prompt": "hi", "response": "hello"},
        {"id": "b", "prompt": "bye", "response": "see you"}]


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_good_files_read_with_ids_and_passthrough(tmp_path):
    rows = read_rows(str(jsonl(tmp_path / "t.jsonl", [{**GOOD[0], "src": "x"},
                                                      {"prompt": "p", "response": "r"}])))
    assert rows[0]["src"] == "x" and rows[1]["id"] == "t:2"


@pytest.mark.parametrize("maker", [jsonl, parquet])
def test_missing_column_names_file_row_and_column(tmp_path, maker):
    path = maker(tmp_path / ("t.jsonl" if maker is jsonl else "t.parquet"),
                 [{"id": "a", "question": "hi", "response": "x"}])
    with pytest.raises(DataError, match=r"t\.(jsonl|parquet), (line 1|row 0), column 'prompt': "
                                        r"missing \(found columns: id, question, response\)"):
        read_rows(str(path))


@pytest.mark.parametrize("value", [None, "", "   "])
def test_null_or_empty_response(tmp_path, value):
    path = jsonl(tmp_path / "t.jsonl", [GOOD[0], {"id": "b", "prompt": "p", "response": value}])
    with pytest.raises(DataError, match=r"t\.jsonl, line 2, column 'response': null or empty"):
        read_rows(str(path))


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n{\"id\": \"b\", \"prompt\": \n")
    with pytest.raises(DataError, match=r"t\.jsonl, line 2: malformed JSON"):
        read_rows(str(path))


def test_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(json.dumps(GOOD[0]).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"t\.jsonl, line 2: bytes that are not UTF-8"):
        read_rows(str(path))


@pytest.mark.parametrize("pack", ["gzip", "bz2", "lzma"])
def test_a_compressed_jsonl_file_is_named_as_compressed(tmp_path, pack):
    """A .jsonl file that was gzip/bzip2/xz-compressed is refused as such, not as bad bytes."""
    import importlib
    module = importlib.import_module(pack)
    path = tmp_path / "t.jsonl"
    path.write_bytes(module.compress((json.dumps(GOOD[0]) + "\n").encode() * 50))
    name = {"gzip": "gzip", "bz2": "bzip2", "lzma": "xz"}[pack]
    with pytest.raises(DataError, match=rf"t\.jsonl: a {name}-compressed file; LANCET reads "
                                        r"plain JSONL text: decompress it first"):
        read_rows(str(path))


def test_duplicate_ids_across_files(tmp_path):
    jsonl(tmp_path / "a.jsonl", GOOD)
    jsonl(tmp_path / "b.jsonl", [GOOD[1]])
    with pytest.raises(DataError, match=r"b\.jsonl, line 1, column 'id': duplicate id 'b' "
                                        r"\(first at .*a\.jsonl, line 2\)"):
        read_rows(str(tmp_path))


def test_shards_with_different_schemas(tmp_path):
    parquet(tmp_path / "a.parquet", GOOD)
    parquet(tmp_path / "b.parquet", [{**GOOD[0], "id": "c", "extra": 1}])
    with pytest.raises(DataError, match=r"b\.parquet: columns .* differ from .*a\.parquet"):
        read_rows(str(tmp_path / "*.parquet"))


def test_empty_query_file_and_missing_path(tmp_path):
    (tmp_path / "q.jsonl").write_text("")
    with pytest.raises(DataError, match=r"data.queries=.*q\.jsonl: no rows"):
        read_rows(str(tmp_path / "q.jsonl"), key="data.queries")
    with pytest.raises(DataError, match=r"data.train=.*nope: no such file"):
        read_rows(str(tmp_path / "nope"), key="data.train")


def test_other_formats(tmp_path):
    hh = jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                                        "rejected": "\n\nHuman: hi\n\nAssistant: go away"}])
    row = read_rows(str(hh), "hh_rlhf")[0]
    assert row["prompt"].endswith("Assistant:") and row["response"] == "hello"
    bt = jsonl(tmp_path / "bt.jsonl", [{"prompt": "p", "response": "r", "is_safe": "yes"}])
    with pytest.raises(DataError, match=r"line 1, column 'is_safe': missing or not a boolean"):
        read_rows(str(bt), "beavertails")
    with pytest.raises(DataError, match="data.format='csv'"):
        read_rows(str(bt), "csv")


def test_model_dir_missing_corrupt_or_unsupported(tmp_path):
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(tmp_path / "none")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json: not valid JSON"):
        load_model(bad)
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ModelLoadError, match="cannot load the model"):
        load_model(tmp_path / "m")


def test_unsupported_architecture_names_itself():
    from transformers import BertConfig, BertLMHeadModel
    bert = BertLMHeadModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, vocab_size=30, is_decoder=True))
    with pytest.raises(UnsupportedModelError, match="BertLMHeadModel"):
        discover_units(bert, "linfac")


def test_tokenizer_without_pad_token_uses_eos(tmp_path):
    from pipeline.demo.model import train_tokenizer
    tok = train_tokenizer(["a b c"])
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_too_long_sequences_are_truncated_and_counted_or_refused():
    from operators.sequences import SequenceTooLongError, encode
    from pipeline.demo.model import train_tokenizer
    tok = train_tokenizer(["w " * 10])
    enc = encode(tok, "w w w", "w " * 20, 8)
    assert enc.truncated and len(enc.input_ids) == 8
    with pytest.raises(SequenceTooLongError, match="exceed the context of 8"):
        encode(tok, "w w w", "w " * 20, 8, truncate=False)


def test_jsonl_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(tmp_path / "t.jsonl", GOOD).read_bytes())
    assert [r["id"] for r in read_rows(str(path))] == ["a", "b"]


def test_model_dir_without_tokenizer_files_is_refused(tmp_path):
    from pipeline.demo.model import train_tokenizer
    tiny_model("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=f"model.path={tmp_path}: no tokenizer files "
                                             r"\(missing tokenizer.json"):
        check_model_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="empty vocabulary|cannot load the tokenizer"):
        load_tokenizer(tmp_path)  # what transformers alone would hand every later stage
    train_tokenizer(["a b c"]).save_pretrained(tmp_path)
    check_model_dir(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="missing merges.txt"):
        check_model_dir(tmp_path)
