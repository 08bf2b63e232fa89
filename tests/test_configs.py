"""Every config option composes and converts into the typed schema (real Hydra)."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import USER_MAX_LENGTH, LancetConf, register, to_typed
from pipeline.specs import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir()
          if g.is_dir() and g.name != "deepspeed" and not g.name.startswith("_")}
USER_DATA = ["data.train=t", "data.queries=q"]
REQUIRED = {"model=hf": ["model.path=/m", *USER_DATA], "data=custom": USER_DATA,
            # the user's judges generate 64 tokens: more than the demo's whole context
            "judge=keyword": ["judge.patterns=[x]", *USER_DATA],
            "judge=classifier": ["judge.path=/c", *USER_DATA]}
register()


def compose_typed(overrides):
    fixed = ["output_dir=/tmp/o", "cache_dir=/tmp/c"]  # normally Hydra's run directory
    if any(o.startswith("+sweep") for o in overrides):
        fixed.append("mlflow.tracking_uri=sqlite:///tmp/m.db")  # normally the sweep directory
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return to_typed(compose("config", overrides=[*overrides, *fixed]))


@pytest.mark.parametrize("choice", [f"{g}={o}" for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_validates(choice):
    group = choice.split("=")[0]
    prefix = "+" if group in ("sweep",) else ""
    typed = compose_typed([prefix + choice, *REQUIRED.get(choice, [])])
    assert isinstance(typed, LancetConf)
    validate(typed)


def test_defaults_are_the_demo():
    typed = compose_typed([])
    assert typed.model.path == "" and typed.influence.method == "linfac"
    assert typed.influence.alpha == 0.6 and typed.model.trust_remote_code is False
    assert typed.ibo.method == "ibo" and typed.judge.patterns


def test_a_misspelt_key_is_refused_by_the_schema():
    from hydra.errors import ConfigCompositionException
    with pytest.raises(ConfigCompositionException, match="alpah"):
        compose_typed(["influence.alpah=0.5"])


def test_ray_storage_keeps_uris_and_makes_folders_absolute(tmp_path, monkeypatch):
    from cluster.runtime import storage_uri
    assert storage_uri("s3://bucket/lancet") == "s3://bucket/lancet"
    monkeypatch.chdir(tmp_path)
    made = storage_uri("shared/ray")
    assert made == str(tmp_path / "shared" / "ray") and (tmp_path / "shared" / "ray").is_dir()


def test_cluster_gpu_means_bfloat16_unless_overridden():
    assert compose_typed(["cluster=gpu"]).model.dtype == "bfloat16"
    assert compose_typed(["cluster=gpu", "model.dtype=float32"]).model.dtype == "float32"
    assert compose_typed(["cluster=gpu"]).cluster.gpus_per_worker == 1
    assert compose_typed([]).model.dtype == "float32"


def test_query_rank_reaches_the_influence_config():
    from pipeline.specs import influence
    assert influence(compose_typed(["influence.query_rank=32"])).query_rank == 32
    assert influence(compose_typed([])).query_rank is None


def test_query_grouping_reaches_the_influence_config_and_the_score_stage_key():
    from pipeline.specs import influence
    from pipeline.stages.table import STAGES
    in_order = compose_typed(["influence.query_grouping=order", "influence.query_batch_size=4"])
    assert influence(in_order).query_grouping == "order"
    assert influence(compose_typed([])).query_grouping == "similarity"
    score = next(s for s in STAGES if s.name == "score")
    assert "influence.query_grouping" in score.config_keys  # another grouping: another scoring


def test_logodds_cap_reaches_the_factors_and_the_scores_and_both_stage_keys():
    from pipeline.specs import factor_spec, influence
    from pipeline.stages.table import STAGES
    cfg = compose_typed(["influence.logodds_cap=2.5"])
    assert influence(cfg).logodds_cap == 2.5 and factor_spec(cfg, "m").logodds_cap == 2.5
    for name in ("fit_factors", "score"):  # another cap: other factors, other scores
        assert "influence.logodds_cap" in next(s for s in STAGES if s.name == name).config_keys


def test_query_parts_reach_the_score_spec_with_the_judges_patterns_where_they_judge():
    from pipeline.specs import influence, score_spec
    from pipeline.stages.table import STAGES
    assert influence(compose_typed([])).query_parts == ("response", "judged", "opening")
    one = compose_typed(["influence.query_parts=[response]", "influence.opening_tokens=5"])
    assert influence(one).query_parts == ("response",) and influence(one).opening_tokens == 5
    assert score_spec(compose_typed([]), "m").judge_patterns  # the demo's judge, on the demo
    user = ["model.path=/m", "data.train=t.jsonl", "data.queries=q.jsonl"]
    assert score_spec(compose_typed(user), "m").judge_patterns == ()  # never on user data
    mine = compose_typed(user + ["judge=keyword", "judge.patterns=[idiot]"])
    assert score_spec(mine, "m").judge_patterns == ("idiot",)
    score = next(s for s in STAGES if s.name == "score")
    assert {"influence.query_parts", "influence.opening_tokens", "judge.patterns",
            "influence.opening_outside_judged"} <= set(score.config_keys)
    with pytest.raises(ValueError, match=re.escape("influence.query_parts: 'tail' is not")):
        validate(compose_typed(["influence.query_parts=[response,tail]"]))
    for rule in ("drop", "keep"):
        cfg = compose_typed([f"influence.opening_outside_judged={rule}"])
        assert influence(cfg).opening_outside_judged == rule
    with pytest.raises(ValueError, match="influence.opening_outside_judged='never'"):
        validate(compose_typed(["influence.opening_outside_judged=never"]))


def test_the_second_hop_is_configured_refused_and_fingerprinted():
    from pipeline.specs import influence, validate
    from pipeline.stages.table import STAGES
    assert influence(compose_typed([])).expand_top_k == 30
    assert influence(compose_typed(["influence.expand_top_k=0"])).expand_top_k == 0
    for name in ("linfac", "ekfac", "kfac", "gradsim", "repsim"):
        assert influence(compose_typed([f"influence={name}"])).expand_top_k == 30
    score = next(s for s in STAGES if s.name == "score")
    assert "influence.expand_top_k" in score.config_keys
    with pytest.raises(ValueError, match=re.escape("influence.expand_top_k=-3")):
        validate(compose_typed(["influence.expand_top_k=-3"]))


# Every numeric key of pipeline/config.py, out of range: refused at start-up, naming the key.
OUT_OF_RANGE = [
    ("model.max_length=1", "model.max_length=1: must be >= 2"),
    ("demo.bad_rate=0", "demo.bad_rate=0.0: must be in (0, 1]"),
    ("demo.width=0", "demo.width=0: must be >= 1"),
    ("demo.layers=0", "demo.layers=0: must be >= 1"),
    ("demo.heads=0", "demo.heads=0: must be >= 1"),
    ("demo.epochs=0", "demo.epochs=0: must be >= 1"),
    ("demo.lr=0", "demo.lr=0.0: must be > 0"),
    ("demo.max_length=1", "model.max_length=1: must be >= 2"),
    ("influence.alpha=0", "influence.alpha=0.0: must be in (0, 1]"),
    ("influence.max_fraction=1.5", "influence.max_fraction=1.5: must be in (0, 1)"),
    ("influence.query_batch_size=0", "influence.query_batch_size=0: must be >= 1"),
    ("influence.expand_top_k=-1", "influence.expand_top_k=-1: must be an integer >= 0"),
    ("influence.damping=-1.0", "influence.damping=-1.0: must be >= 0"),
    ("influence.damping=nan", "influence.damping=nan: must be >= 0"),
    ("influence.damping_absolute=-1e-3", "influence.damping_absolute=-0.001: must be >= 0"),
    ("influence.attribution_top_k=-1", "influence.attribution_top_k=-1: must be >= 0"),
    ("influence.attribution_contrast=-1", "influence.attribution_contrast=-1: must be >= 0"),
    ("influence.opening_tokens=0", "influence.opening_tokens=0: must be >= 1"),
    ("influence.logodds_cap=0.5", "influence.logodds_cap=0.5: must be a finite number >= 1"),
    ("influence.logodds_cap=-2", "influence.logodds_cap=-2.0: must be a finite number >= 1"),
    ("influence.logodds_cap=nan", "influence.logodds_cap=nan: must be a finite number >= 1"),
    ("influence.logodds_cap=inf", "influence.logodds_cap=inf: must be a finite number >= 1"),
    ("ibo.beta=0", "ibo.beta=0.0: must be > 0"),
    ("ibo.gamma=-1", "ibo.gamma=-1.0: must be >= 0"),
    ("ibo.steps=0", "ibo.steps=0: must be >= 1"),
    ("ibo.lr=0", "ibo.lr=0.0: must be > 0"),
    ("ibo.batch_size=0", "ibo.batch_size=0: must be >= 1"),
    ("ibo.checkpoint_every=0", "ibo.checkpoint_every=0: must be >= 1"),
    ("ibo.bregman_topk=0", "ibo.bregman_topk=0: must be >= 1"),
    ("ibo.lora.r=0", "ibo.lora.r=0: must be >= 1"),
    ("ibo.lora.alpha=0", "ibo.lora.alpha=0: must be > 0"),
    ("ibo.lora.dropout=1.0", "ibo.lora.dropout=1.0: must be in [0, 1)"),
    ("eval.relearn_lr=0", "eval.relearn_lr=0.0: must be > 0"),
    ("judge.threshold=1.5", "judge.threshold=1.5: must be in [0, 1]"),
    ("judge.max_new_tokens=0", "judge.max_new_tokens=0: must be >= 1"),
    ("cluster.num_workers=0", "cluster.num_workers=0: must be >= 1"),
    ("cluster.cpus_per_worker=0", "cluster.cpus_per_worker=0.0: must be > 0"),
    ("cluster.gpus_per_worker=-1", "cluster.gpus_per_worker=-1.0: must be >= 0"),
    ("cluster.threads_per_worker=0", "cluster.threads_per_worker=0: must be >= 1"),
    ("cluster.batch_size=0", "cluster.batch_size=0: must be >= 1"),
    ("cluster.local_cpus=0", "cluster.local_cpus=0: must be >= 1"),
    ("cluster.autoscale_timeout_s=0", "cluster.autoscale_timeout_s=0.0: must be > 0"),
    ("cluster.max_failures=-2", "cluster.max_failures=-2: must be >= 0"),
    ("cluster.progress_every_s=0", "cluster.progress_every_s=0.0: must be > 0"),
]


@pytest.mark.parametrize("override,message", OUT_OF_RANGE)
def test_numeric_settings_out_of_range_name_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(compose_typed([override]))


def test_user_paths_get_user_defaults_not_the_demos():
    demo = compose_typed([])
    assert demo.model.max_length == 64 and demo.data.label_column == ""
    user = compose_typed(["model.path=/m", "data.train=t.jsonl", "data.queries=q.jsonl"])
    assert user.model.max_length == USER_MAX_LENGTH == compose_typed(
        ["model=hf", "model.path=/m", "data=custom", "data.train=t", "data.queries=q"]
    ).model.max_length
    assert user.data.label_column == ""
    kept = compose_typed(["model.path=/m", "data.train=t", "data.queries=q", "model.max_length=32"])
    assert kept.model.max_length == 32  # what the user sets stays set


def test_demo_only_settings_refuse_to_judge_or_replace_user_inputs():
    with pytest.raises(ValueError, match="judge: the demo's keyword judge only judges the demo"):
        compose_typed(["model.path=/m", "data.train=t", "data.queries=q", "data.eval=e"])
    ok = compose_typed(["model.path=/m", "data.train=t", "data.queries=q", "data.eval=e",
                        "judge=keyword", "judge.patterns=[x]"])
    assert ok.judge.patterns == ["x"]
    with pytest.raises(ValueError, match="model.path=/m: data.train is empty"):
        compose_typed(["model.path=/m"])
