"""Config values and model folders that used to pass the start-up checks and fail (or do
harm) only inside a stage: each is refused before any stage runs, naming the key."""

from __future__ import annotations

import json
import logging
import re

import pytest
from test_configs import compose_typed

from cluster.model_checks import check_model_fits
from operators.errors import UserError
from pipeline import specs
from pipeline.config import max_length_of


@pytest.mark.parametrize("key", ["ibo.lr", "ibo.beta", "ibo.gamma", "influence.damping",
                                 "eval.relearn_lr", "demo.lr", "cluster.autoscale_timeout_s"])
@pytest.mark.parametrize("value", ["inf", "-inf"])
def test_an_infinite_number_is_refused_naming_its_key(key, value):
    """(-inf often fails the key's own range check first: either way, its key and value.)"""
    with pytest.raises(UserError, match=rf"^{key}={value}: must be "):
        specs.validate(compose_typed([f"{key}={value}"]))


@pytest.mark.parametrize("override", ["+foo=1", "+influence.alpah=0.5", "+ibo.lora.rank=4"])
def test_a_key_added_with_plus_that_lancet_does_not_know_is_refused(override):
    key = override[1:].split("=")[0]
    with pytest.raises(UserError, match=rf"^{key}: not a LANCET config key"):
        compose_typed([override])


def test_the_sweep_config_group_added_with_plus_still_composes():
    cfg = compose_typed(["+sweep=alpha_batch"])
    specs.validate(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["mlflow.experiment="], r"^mlflow.experiment is empty"),
    (["cluster.score_shard_rows=0"], r"^cluster.score_shard_rows=0: must be >= 1$"),
])
def test_keys_a_late_stage_reads_are_checked_at_start(overrides, message):
    with pytest.raises(UserError, match=message):
        specs.validate(compose_typed(overrides))
    specs.validate(compose_typed([*overrides, "mlflow.enabled=false"])
                   if "mlflow" in overrides[0] else compose_typed([]))


def test_a_missing_deepspeed_json_is_refused_only_where_the_run_corrects(tmp_path):
    cfg = compose_typed([f"ibo.deepspeed_config={tmp_path / 'none.json'}"])
    with pytest.raises(UserError, match=r"^ibo.deepspeed_config=.*none.json: no such file$"):
        specs.check_inputs(cfg)
    specs.check_inputs(cfg, corrects=False)  # pipeline.until=score reads no DeepSpeed JSON


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A GPT-2 folder of 64 positions with a word-level tokenizer of its own."""
    from pipeline.demo.model import TinyModelConfig, train_demo_model
    rows = [dict(prompt=f"question {i} ?", response=f"answer {i} .") for i in range(8)]
    model, tok = train_demo_model(rows, [], TinyModelConfig(width=16, layers=1, heads=2,
                                                             context=64, epochs=1))
    path = tmp_path_factory.mktemp("model") / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _user(model_dir, *overrides):
    return compose_typed([f"model.path={model_dir}", "data.train=/data/train.jsonl",
                          "data.queries=/data/queries.jsonl", *overrides])


def test_a_user_model_with_fewer_positions_gets_them_as_its_default_length(model_dir):
    assert max_length_of(_user(model_dir)) == 64
    cfg = _user(model_dir, "model.max_length=65")
    with pytest.raises(UserError, match=r"^model.max_length=65: the model at .* takes at most 64 "
                                        r"tokens \(n_positions in its config.json\)"):
        specs.check_inputs(cfg)
    specs.check_inputs(_user(model_dir, "model.max_length=64"))


def test_a_tokenizer_whose_ids_pass_the_models_embeddings_is_refused(model_dir, tmp_path):
    from cluster.model_io import load_model, load_tokenizer
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    model = load_model(model_dir)
    model.resize_token_embeddings(vocab - 5)
    model.save_pretrained(tmp_path / "small")
    load_tokenizer(model_dir).save_pretrained(tmp_path / "small")
    with pytest.raises(UserError, match=r"the tokenizer gives token ids up to \d+ but the model "
                                        rf"embeds {vocab - 5} \(vocab_size in its config.json\)"):
        check_model_fits(tmp_path / "small", 64)
    check_model_fits(model_dir, 64)


def test_lora_target_modules_the_model_lacks_are_refused_listing_its_linear_modules(model_dir):
    cfg = _user(model_dir, "ibo.lora.enabled=true", "ibo.lora.target_modules=[q_proj,c_attn]")
    with pytest.raises(UserError, match=r"^ibo.lora.target_modules: \['q_proj'\] name no module "
                                        r"of the model at .* \(its linear modules: .*c_attn"):
        specs.check_inputs(cfg)
    specs.check_inputs(_user(model_dir, "ibo.lora.enabled=true",
                             "ibo.lora.target_modules=[c_attn,c_fc]"))
    specs.check_inputs(cfg, corrects=False)  # no correction, no adapters


def test_a_classifier_judge_that_is_not_there_is_refused_at_start(model_dir, tmp_path):
    cfg = _user(model_dir, "judge=classifier", f"judge.path={tmp_path / 'judge'}")
    with pytest.raises(UserError, match=r"^judge.path=.*judge: no such directory$"):
        specs.check_inputs(cfg)
    judge = tmp_path / "judge"
    judge.mkdir()
    for name in model_dir.iterdir():
        (judge / name.name).write_bytes(name.read_bytes())
    config = json.loads((judge / "config.json").read_text())
    config["id2label"] = {"0": "safe", "1": "toxic"}
    (judge / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"^judge.label='unsafe': the classifier at .* has the "
                                        r"labels safe, toxic$"):
        specs.check_inputs(cfg)
    specs.check_inputs(_user(model_dir, "judge=classifier", f"judge.path={judge}",
                             "judge.label=toxic"))


@pytest.mark.parametrize("override, message", [
    ("judge.patterns=['']", r"^judge.patterns: an empty pattern \(''\) matches every output$"),
    ("judge.refusal_patterns=[' ']", r"^judge.refusal_patterns: an empty pattern"),
    ("judge.max_new_tokens=64", r"^judge.max_new_tokens=64: leaves no room for the prompt "
                                r"within model.max_length=64$"),
])
def test_a_judge_that_would_flag_everything_or_read_no_prompt_is_refused(override, message):
    with pytest.raises(UserError, match=message):
        specs.validate(compose_typed([override]))


def _closed_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:{port}", r"^cluster.address=127.0.0.1:\d+: no Ray cluster answers there"),
    ("ray://127.0.0.1:{port}", r"^cluster.address=ray://127.0.0.1:\d+: no Ray cluster answers"),
    ("garbage", r"^cluster.address=garbage: expected host:port, ray://host:port or auto$"),
])
def test_a_ray_address_where_nothing_answers_fails_at_once(address, message):
    """(ray.init used to retry such an address for minutes, printing GCS time-outs.)"""
    from cluster.runtime import ClusterConfig, connect
    with pytest.raises(UserError, match=message):
        connect(ClusterConfig(address=address.format(port=_closed_port())))


def test_a_listening_address_passes_the_reachability_check():
    import socket

    from cluster.runtime import check_reachable
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}", "cluster.address")


@pytest.mark.parametrize("key", ["output_dir", "cache_dir"])
@pytest.mark.parametrize("below", [False, True])
def test_an_output_or_cache_folder_that_is_a_file_is_refused_naming_the_key(tmp_path, key, below):
    """(Was a FileExistsError / NotADirectoryError traceback, exit 1.)"""
    from pipeline.run import run_pipeline
    (tmp_path / "f").write_text("x")
    path = tmp_path / "f" / "sub" if below else tmp_path / "f"
    cfg = compose_typed(["mlflow.enabled=false"])
    setattr(cfg, key, str(path))  # (compose_typed fixes both folders)
    with pytest.raises(UserError, match=rf"^{key}={path}: a file, not a folder"):
        run_pipeline(cfg, {})


def test_an_mlflow_server_where_nothing_answers_fails_before_any_stage(tmp_path):
    """(MLflow's client retried for 4 minutes, then every stage ran unlogged.)"""
    from pipeline.run import TrackingError, run_pipeline
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = compose_typed([f"mlflow.tracking_uri={uri}"])
    cfg.output_dir, cfg.cache_dir = str(tmp_path / "o"), str(tmp_path / "c")
    with pytest.raises(TrackingError, match=rf"^the MLflow tracking store {uri} does not answer"):
        run_pipeline(cfg, {})
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("uri, why", [
    ("garbage://x", "MLflow has no tracking store for the scheme 'garbage' (it knows "),
    ("sqlite:///{tmp}/f/mlflow.db", "cannot be opened ("),
])
def test_a_tracking_store_that_cannot_open_fails_before_any_stage(tmp_path, uri, why):
    """(An unknown scheme ran every stage unlogged and failed at the end, saying only
    'garbage'; so did a SQLite file under a file.)"""
    from pipeline.run import TrackingError, run_pipeline
    (tmp_path / "f").write_text("x")
    uri = uri.format(tmp=tmp_path)
    cfg = compose_typed([f"mlflow.tracking_uri={uri}"])
    cfg.output_dir, cfg.cache_dir = str(tmp_path / "o"), str(tmp_path / "c")
    with pytest.raises(TrackingError, match=rf"^the MLflow tracking store {uri} cannot be "
                                            r"opened \(.*\); fix mlflow.tracking_uri") as err:
        run_pipeline(cfg, {})
    assert why in str(err.value)
    assert not (tmp_path / "c").exists()


def _config_only(path, model_type, tokenizer_from=None, **fields):
    """A model folder holding only a config.json (enough for the weightless start-up checks)."""
    from transformers import AutoConfig
    AutoConfig.for_model(model_type, **fields).save_pretrained(path)
    if tokenizer_from is not None:
        from cluster.model_io import load_tokenizer
        load_tokenizer(tokenizer_from).save_pretrained(path)
    return path


def test_an_architecture_lancet_cannot_cut_into_units_fails_at_start(model_dir, tmp_path):
    from operators.units import UnsupportedModelError
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    bert = _config_only(tmp_path / "bert", "bert", model_dir, vocab_size=vocab, hidden_size=16,
                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        is_decoder=True)
    (bert / "model.safetensors").write_bytes(b"")  # never read: the check builds it weightless
    with pytest.raises(UnsupportedModelError, match="of BertLMHeadModel has attention but no"):
        specs.check_inputs(_user(bert))
    specs.check_inputs(_user(bert, "influence=repsim"))  # takes no gradients: no units


def test_block_weights_no_unit_covers_are_named_for_the_user(model_dir, tmp_path, caplog):
    from cluster.model_checks import check_units
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    mixtral = _config_only(tmp_path / "mixtral", "mixtral", model_dir, vocab_size=vocab,
                           hidden_size=16,
                           intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1)
    uncovered = check_units(mixtral, "ekfac")
    assert {n.split(".mlp.")[1] for n in uncovered} == {"experts.gate_up_proj", "experts.down_proj",
                                                       "gate.weight"}  # fused, and the router
    assert check_units(mixtral, "linfac") == []  # the whole feed-forward sublayer is one unit
    assert check_units(mixtral, "ekfac", module_filter="q_proj") == []  # left out on purpose
    (mixtral / "model.safetensors").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="lancet"):
        specs.check_inputs(_user(mixtral, "influence=ekfac"), corrects=False)
    assert re.search(r"influence.method=ekfac: 6 weight matrices of the model's blocks are not "
                     r"linear modules .* influence.method=linfac covers every sublayer", caplog.text)
