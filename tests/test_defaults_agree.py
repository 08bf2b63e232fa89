"""One default per setting: the Hydra schema (pipeline/config.py) and the dataclasses that
consume it (cluster/, operators/) must agree, so code that builds a spec directly (tests,
benchmarks, a user's own script) behaves as the CLI does."""

from dataclasses import fields, is_dataclass

import pytest

from cluster.batches import TokenizeConfig
from cluster.eval_job import EvalSpec
from cluster.factor_job import FactorSpec
from cluster.ibo_job import IBOSpec
from cluster.relearn_job import RelearnSpec
from cluster.runtime import ClusterConfig
from cluster.scoring import ScoreSpec
from operators.factors import DampingConfig
from operators.scores import InfluenceConfig
from operators.selection import SelectionConfig
from pipeline import specs
from pipeline.config import USER_MAX_LENGTH, LancetConf

# Inputs a spec is given, not defaults it chooses.
INPUTS = {"model_path", "deepspeed_config", "tokenizer_path"}


def disagreements(built, default, where: str = "") -> list[str]:
    """Every field where the spec built from the config's defaults differs from the class's."""
    found = []
    for f in fields(built):
        mine, theirs = getattr(built, f.name), getattr(default, f.name)
        if f.name in INPUTS:
            continue
        if is_dataclass(mine):
            found += disagreements(mine, theirs, f"{where}{f.name}.")
        elif mine != theirs:
            found.append(f"{where}{f.name}: config {mine!r}, {type(default).__name__} {theirs!r}")
    return found


def user_defaults() -> LancetConf:
    """The defaults a user's run resolves to (their own data: no demo-only settings)."""
    cfg = LancetConf()
    cfg.data.train, cfg.model.path = "train.jsonl", "model"
    return cfg


CASES = {
    "cluster": (lambda c: specs.cluster(c), lambda: ClusterConfig()),
    "influence": (lambda c: specs.influence(c), lambda: InfluenceConfig()),
    "damping": (lambda c: specs.damping(c), lambda: DampingConfig()),
    "selection": (lambda c: specs.selection(c), lambda: SelectionConfig()),
    "tokenize": (lambda c: specs.tokenize(c), lambda: TokenizeConfig()),
    "factors": (lambda c: specs.factor_spec(c, "m"), lambda: FactorSpec(model_path="m")),
    "scores": (lambda c: specs.score_spec(c, "m"), lambda: ScoreSpec(model_path="m")),
    "ibo": (lambda c: specs.ibo_spec(c, "m"),
            lambda: IBOSpec(model_path="m", deepspeed_config="d")),
    "evaluate": (lambda c: specs.eval_spec(c, "m"), lambda: EvalSpec(tokenizer_path="m")),
    "relearn": (lambda c: specs.relearn_spec(c), lambda: RelearnSpec()),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_config_and_the_spec_classes_have_the_same_defaults(name):
    build, default = CASES[name]
    assert disagreements(build(user_defaults()), default()) == []


def test_a_disagreement_is_found_and_named():
    cfg = user_defaults()
    cfg.model.max_length = 7
    built = specs.ibo_spec(cfg, "m")
    assert disagreements(built, IBOSpec(model_path="m", deepspeed_config="d")) == [
        f"objective.tokenize.max_length: config 7, TokenizeConfig {USER_MAX_LENGTH}"]
