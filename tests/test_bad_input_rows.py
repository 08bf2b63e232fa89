"""Bad values inside user rows are refused at ``prepare``, naming the file, the row and the
column: labels that are not booleans, unknown eval splits, reserved column names, text that is
not Unicode, chat templates that fail, queries cut to nothing, columns that mix types."""

import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chat_tokenizer import chat_tokenizer
from tiny_models import tiny_model

from cluster import attribution, score_shards
from cluster.cells import SCORED_COLUMNS
from cluster.dataio import DataError, iter_validated, read_rows
from operators.chat import ChatTemplateError, prompt_ids
from operators.errors import UserError
from operators.sequences import Encoded
from pipeline.artifacts import Prepared
from pipeline.config import LancetConf
from pipeline.evaluation import judged
from pipeline.stages import prepare

ROWS = [{"id": "a", "prompt": "tell me a story", "response": "once upon a time"},
        {"id": "b", "prompt": "how are you", "response": "fine thanks"}]
SYSTEM_RAISES = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
                 "supported') }}{% endif %}{% for m in messages %}{{ m['content'] }} {% endfor %}")


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """``model_dirs(template)``: a tiny model folder whose tokenizer has ``template``."""
    made = {}

    def make(template=None):
        if template not in made:
            folder = tmp_path_factory.mktemp("model")
            tiny_model("gpt2").save_pretrained(folder)
            chat_tokenizer(template).save_pretrained(folder)
            made[template] = folder
        return made[template]
    return make


def run_prepare(tmp_path, model_dir, train=ROWS, queries=ROWS, evals=None, **data):
    """``prepare`` on JSONL files built from the rows; returns (info, warnings logged)."""
    cfg = LancetConf()
    cfg.model.path, cfg.model.max_length = str(model_dir), 64
    cfg.data.train = str(jsonl(tmp_path / "train.jsonl", train))
    cfg.data.queries = str(jsonl(tmp_path / "queries.jsonl", queries))
    if evals is not None:
        cfg.data.eval = str(jsonl(tmp_path / "eval.jsonl", evals))
    for key, value in data.items():
        setattr(cfg.data, key, value)
    out, logged = Prepared(tmp_path / "out"), []
    out.root.mkdir(exist_ok=True)
    prepare._bring_your_own(cfg, out, logged.append)
    return out.info(), logged


# 1. data.label_column

def test_a_boolean_or_0_1_label_column_is_read(tmp_path, model_dirs):
    train = [{**ROWS[0], "planted": True}, {**ROWS[1], "planted": False}]
    info, _ = run_prepare(tmp_path, model_dirs(), train, label_column="planted")
    assert info["label_column"] == "planted" and info["rows"] == 2
    train = [{**ROWS[0], "planted": 1}, {**ROWS[1], "planted": 0}]
    assert run_prepare(tmp_path, model_dirs(), train, label_column="planted")[0]["rows"] == 2


@pytest.mark.parametrize("value, got", [("no", "str 'no'"), (None, "null"), (2, "int 2"),
                                        (0.0, "float 0.0")])
def test_a_label_that_is_not_a_boolean_is_refused(tmp_path, model_dirs, value, got):
    train = [{**ROWS[0], "planted": True}, {**ROWS[1], "planted": value}]
    with pytest.raises(DataError, match=rf"train\.jsonl, line 2, column 'planted': expected a "
                                        rf"boolean \(true/false or 0/1\) .*got {got}"):
        run_prepare(tmp_path, model_dirs(), train, label_column="planted")
    assert not (tmp_path / "out" / "train.parquet").exists()


def test_a_row_without_the_label_column_is_refused(tmp_path, model_dirs):
    train = [{**ROWS[0], "planted": True}, ROWS[1]]
    with pytest.raises(DataError, match=r"train\.jsonl, line 2, column 'planted': missing"):
        run_prepare(tmp_path, model_dirs(), train, label_column="planted")


# 2. data.eval's split

@pytest.mark.parametrize("split", ["Unseen", "test", "", 1])
def test_an_unknown_eval_split_is_refused(tmp_path, model_dirs, split):
    evals = [{"prompt": "hi", "split": "seen"}, {"prompt": "why", "split": split}]
    with pytest.raises(DataError, match=rf"eval\.jsonl, line 2, column 'split': {split!r} is "
                                        r"not one of seen, unseen"):
        run_prepare(tmp_path, model_dirs(), evals=evals)


def test_an_eval_row_without_a_split_counts_as_seen(tmp_path, model_dirs):
    evals = [{"prompt": "hi", "split": "unseen"}, {"prompt": "why"}, {"prompt": "no", "split": None}]
    assert run_prepare(tmp_path, model_dirs(), evals=evals)[0]["eval_prompts"] == 3
    prompts = pq.read_table(tmp_path / "out" / "eval.parquet").to_pylist()
    rates = judged(prompts, ["x", "y", "z"], SimpleNamespace(flags=lambda t: [True, True, False]))
    assert (rates["rate_seen"], rates["rate_unseen"]) == (0.5, 1.0)


# 3. column names the pipeline writes itself

@pytest.mark.parametrize("name", SCORED_COLUMNS)
def test_a_training_column_named_as_a_score_column_is_refused(tmp_path, model_dirs, name):
    train = [ROWS[0], {**ROWS[1], name: 3}]
    with pytest.raises(DataError, match=rf"train\.jsonl, line 2, column '{name}': the name is "
                                        r"reserved .*rename the column"):
        run_prepare(tmp_path, model_dirs(), train)


def test_the_reserved_names_are_the_ones_the_pipeline_adds():
    assert {attribution.COLUMN, attribution.DEPENDENCE, score_shards.RAW, "score", "rank",
            "set"} <= set(SCORED_COLUMNS)


def test_a_prompt_turns_column_is_refused_in_any_file(tmp_path):
    path = jsonl(tmp_path / "q.jsonl", [{**ROWS[0], "prompt_turns": "just text"}])
    with pytest.raises(DataError, match=r"q\.jsonl, line 1, column 'prompt_turns': the name is "
                                        r"reserved .*give the conversation as 'messages'"):
        read_rows(str(path), key="data.queries")


def test_other_extra_columns_pass_through(tmp_path, model_dirs):
    train = [{**ROWS[0], "source": "web", "weight": 1.0}, {**ROWS[1], "source": "book"}]
    run_prepare(tmp_path, model_dirs(), train, queries=[{**ROWS[0], "score": 0.9}])
    table = pq.read_table(tmp_path / "out" / "train.parquet")
    assert table.column("source").to_pylist() == ["web", "book"]


# 4. text that is not Unicode

@pytest.mark.parametrize("row, column", [({**ROWS[0], "note": "a\ud800b"}, "note"),
                                         ({**ROWS[0], "response": "x\udc80"}, "response"),
                                         ({**ROWS[0], "tags": ["ok", "\udfff"]}, "tags")])
def test_a_lone_surrogate_escape_is_refused(tmp_path, row, column):
    path = jsonl(tmp_path / "t.jsonl", [ROWS[1], row])
    with pytest.raises(DataError, match=rf"t\.jsonl, line 2, column '{column}': not valid "
                                        r"Unicode text"):
        read_rows(str(path))


def test_an_escaped_surrogate_pair_is_text(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", [{**ROWS[0], "note": "smile \U0001f600"}])
    assert "\\ud83d\\ude00" in path.read_text()
    assert read_rows(str(path))[0]["note"] == "smile \U0001f600"


# 5. chat templates that fail

def test_a_template_that_does_not_compile_names_the_model_folder(tmp_path, model_dirs):
    folder = model_dirs("{% if %}")
    with pytest.raises(UserError, match=rf"train\.jsonl, line 1: {folder}: its chat template "
                                        r"fails \(TemplateSyntaxError: .*data.template=plain"):
        run_prepare(tmp_path, folder)
    with pytest.raises(ChatTemplateError, match="TemplateSyntaxError"):
        prompt_ids(chat_tokenizer("{% if %}"), "hi")


def test_a_template_that_raises_on_a_row_names_the_row(tmp_path, model_dirs):
    folder = model_dirs(SYSTEM_RAISES)
    system = {"messages": [{"role": "system", "content": "please help"},
                           {"role": "user", "content": "hi"}]}
    with pytest.raises(DataError, match=rf"eval\.jsonl, line 2: {folder}: its chat template "
                                        r"fails \(TemplateError: System role not supported\)"):
        run_prepare(tmp_path, folder, evals=[{"prompt": "hi"}, system])
    train = [ROWS[0], {"messages": system["messages"] + [{"role": "assistant", "content": "x"}]}]
    with pytest.raises(DataError, match=r"train\.jsonl, line 2: .*System role not supported"):
        run_prepare(tmp_path, folder, train)


# 6. queries longer than model.max_length

def test_a_query_cut_to_a_few_response_tokens_is_counted_and_warned(tmp_path, model_dirs):
    long = {"id": "q", "prompt": " ".join(["one two three four"] * 25), "response": "fine thanks"}
    info, logged = run_prepare(tmp_path, model_dirs(), queries=[ROWS[0], long])
    assert info["queries_truncated"] == 1 and info["truncated"] == 0
    assert len(logged) == 1 and logged[0].startswith("warning: 1 of 2 queries keep fewer than 4 "
                                                     "response tokens within model.max_length=64")
    assert "queries.jsonl, line 2" in logged[0]
    assert run_prepare(tmp_path, model_dirs(), queries=ROWS) == (
        {**info, "queries_truncated": 0}, [])


def test_a_query_that_keeps_no_response_token_is_refused(tmp_path, model_dirs, monkeypatch):
    """``encode`` keeps one response token at least; should a tokenizing path ever keep none,
    the query (whose gradient would be empty) is refused."""
    def prompt_only(tokenizer, config, prompt, response, turns=None):
        return Encoded([1] * 64, [0] * 64, 64, True)

    jsonl(tmp_path / "train.jsonl", ROWS)
    monkeypatch.setattr(prepare, "encode_row", prompt_only)
    with pytest.raises(DataError, match=r"queries\.jsonl, line 1: the prompt fills "
                                        r"model.max_length=64: no response token is left"):
        run_prepare(tmp_path, model_dirs())


# 7. a column that mixes types

def test_a_column_mixing_types_names_the_users_file_and_rows(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", [{**ROWS[0], "meta": 1}, {**ROWS[1], "meta": None},
                                        {"prompt": "p", "response": "r", "meta": "x"}])
    with pytest.raises(DataError, match=rf"t\.jsonl, line 3, column 'meta': text where earlier "
                                        rf"rows hold number \(first at {path}, line 1\)"):
        read_rows(str(path))


def test_types_are_compared_across_shards_and_numbers_mix(tmp_path):
    pq.write_table(pa.Table.from_pylist([{**ROWS[0], "meta": 1}]), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{**ROWS[1], "meta": 2.5}]), tmp_path / "b.parquet")
    assert [r["meta"] for r in iter_validated(str(tmp_path))] == [1, 2.5]
    pq.write_table(pa.Table.from_pylist([{**ROWS[1], "meta": "x"}]), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet, row 0, column 'meta': text where earlier "
                                        r"rows hold number \(first at .*a\.parquet, row 0\)"):
        read_rows(str(tmp_path))


def test_a_nested_type_change_names_the_users_data(tmp_path, model_dirs):
    """Kinds inside lists are left to Arrow: its error names the user's data, not train.parquet."""
    train = [{**ROWS[0], "tags": [1]}, {**ROWS[1], "tags": ["x"]}]
    with pytest.raises(DataError, match=r"data\.train=.*train\.jsonl: column 'tags' mixes types"):
        run_prepare(tmp_path, model_dirs(), train)


def test_a_folder_is_read_whatever_the_case_of_its_suffixes(tmp_path):
    jsonl(tmp_path / "a.jsonl", ROWS[:1])
    jsonl(tmp_path / "b.JSONL", ROWS[1:])
    (tmp_path / ".hidden").write_text("x")
    (tmp_path / "_SUCCESS").write_text("")
    assert [r["id"] for r in read_rows(str(tmp_path))] == ["a", "b"]


def test_a_folder_holding_files_lancet_does_not_read_is_refused(tmp_path):
    """A part.csv beside the JSONL would lose its rows without a word if it were skipped."""
    jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "part.csv").write_text("id,prompt,response\n")
    with pytest.raises(DataError, match=r"^data.train=.*: LANCET reads .parquet, .jsonl, .json "
                                        r"files, not part.csv in this folder"):
        read_rows(str(tmp_path))
    assert [r["id"] for r in read_rows(str(tmp_path / "*.jsonl"))] == ["a", "b"]  # a glob


@pytest.mark.parametrize("chosen, message", [
    ("\n\nHuman: hi\n\nAssistant: sure\n\nHuman: and then?",
     "the dialogue ends with a Human turn"),
    ("\n\nAssistant: sure", "no Human turn with text before the last Assistant turn"),
    ("\n\nHuman:  \n\nAssistant: sure", "no Human turn with text before the last Assistant turn"),
])
def test_an_hh_rlhf_dialogue_not_ending_in_an_answer_to_a_human_is_refused(tmp_path, chosen,
                                                                           message):
    """(A trailing Human turn used to be trained on as part of the response.)"""
    path = jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen}])
    with pytest.raises(DataError, match=rf"hh.jsonl, line 1, column 'chosen': {message}"):
        read_rows(str(path), "hh_rlhf")


def test_an_hh_rlhf_eval_prompt_may_leave_the_answer_out(tmp_path):
    path = jsonl(tmp_path / "hh.jsonl", [{"chosen": "Human: hi\n\nAssistant:"}])
    row, = read_rows(str(path), "hh_rlhf", "data.eval", require_response=False)
    assert row["response"] is None and row["prompt"] == "Human: hi\n\nAssistant:"
    with pytest.raises(DataError, match="the last Assistant turn is empty"):
        read_rows(str(path), "hh_rlhf")


def test_beavertails_ground_truth_is_the_label_column_and_cannot_be_overwritten(tmp_path):
    """``not is_safe`` is written as ``contaminated`` and labels the rows for detection unless
    data.label_column names another column; a user column of that name was overwritten."""
    from test_configs import compose_typed
    rows = [{"prompt": "p", "response": "r", "is_safe": False}]
    row, = read_rows(str(jsonl(tmp_path / "bt.jsonl", rows)), "beavertails")
    assert row["contaminated"] is True
    clash = jsonl(tmp_path / "clash.jsonl", [{**rows[0], "contaminated": "mine"}])
    with pytest.raises(DataError, match=r"clash.jsonl, line 1, column 'contaminated': the name "
                                        r"is reserved \(data.format=beavertails writes it"):
        read_rows(str(clash), "beavertails")
    user = ["model.path=/m", "data.train=t", "data.queries=q", "data.format=beavertails"]
    assert compose_typed(user).data.label_column == "contaminated"
    assert compose_typed([*user, "data.label_column=mine"]).data.label_column == "mine"
    assert compose_typed(["data.train=t", "data.queries=q"]).data.label_column == ""
