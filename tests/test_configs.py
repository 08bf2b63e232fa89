"""Every config option composes and converts into the typed schema (real Hydra)."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import LancetConf, register, to_typed
from pipeline.specs import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir()
          if g.is_dir() and g.name != "deepspeed"}
REQUIRED = {"model=hf": ["model.path=/m"], "data=custom": ["data.train=t", "data.queries=q"],
            "judge=keyword": ["judge.patterns=[x]"], "judge=classifier": ["judge.path=/c"]}
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
    assert typed.influence.alpha == 0.8 and typed.model.trust_remote_code is False
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
