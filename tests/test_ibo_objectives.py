"""The correction objectives' registry (issue #14) and the unlearning baselines' losses (issue
#15): NPO, SimNPO, GA+KL, in float64 against their definitions and through ``step_loss``."""

import math
from pathlib import Path

import pytest
import torch
from chat_tokenizer import chat_tokenizer
from tiny_models import tiny_model

from cluster import ibo_objectives
from cluster.batches import TokenizeConfig
from cluster.ibo_objectives import (
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    Reference,
    get_objective,
    side,
    step_loss,
)
from operators.ibo_loss import (
    IBOLossConfig,
    bregman_loss,
    correction_loss,
    distinct_tokens,
    nll_loss,
    npo_loss,
    simnpo_loss,
    token_correction_loss,
    topk_reference,
)
from operators.sequences import sequence_log_probs, token_log_probs

CONF = Path(__file__).resolve().parents[1] / "conf"
TOKENS = TokenizeConfig(max_length=32, template="plain")
SELECT_DATASETS = {"pairs", "positive", "neutral", "retain", "clean"}  # cluster/selection_io.py


def _row(i, prompt, response, **extra):
    return {"id": f"r{i}", "prompt": prompt, "response": response, **extra}


def rows():
    positive = [_row(0, "tell me a story", "once upon a time the end", weight=1.0),
                _row(1, "what is red", "red is blue green", weight=0.5)]
    neutral = [_row(2, "hi there", "how are you fine thanks"), _row(3, "why", "yes no please")]
    pairs = [{**{f"pos_{k}": v for k, v in positive[0].items()},
              **{f"neg_{k}": v for k, v in neutral[0].items()}, "eps": 0.7},
             {**{f"pos_{k}": v for k, v in positive[1].items()},
              **{f"neg_{k}": v for k, v in neutral[1].items()}, "eps": 1.0}]
    return {"positive": positive, "neutral": neutral, "pairs": pairs, "retain": neutral,
            "clean": neutral}


def test_npo_loss_is_its_definition_and_tends_to_gradient_ascent():
    lp = torch.tensor([-3.0, -7.5, -1.2], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-2.0, -8.0, -4.0], dtype=torch.float64)
    beta = 0.1
    by_hand = [(2 / beta) * math.log(1 + math.exp(beta * (a - b)))  # (2/β)log(1+(π/πref)^β)
               for a, b in zip(lp.tolist(), ref.tolist())]
    torch.testing.assert_close(npo_loss(lp, ref, beta), torch.tensor(by_hand, dtype=torch.float64))
    # its gradient is GA's (1 per log-prob) times 2σ(βΔ): 1 at β → 0
    npo_loss(lp, ref, 1e-7).sum().backward()
    torch.testing.assert_close(lp.grad, torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)


def test_simnpo_loss_is_its_definition_with_the_length_and_margin():
    lp = torch.tensor([-6.0, -2.0], dtype=torch.float64)
    tokens = torch.tensor([4, 1])
    for beta, delta in ((2.5, 0.0), (1.0, 0.3)):
        by_hand = [-(2 / beta) * math.log(1 / (1 + math.exp((beta / n) * a + delta)))
                   for a, n in zip(lp.tolist(), tokens.tolist())]
        torch.testing.assert_close(simnpo_loss(lp, tokens, beta, delta),
                                   torch.tensor(by_hand, dtype=torch.float64))


@pytest.mark.parametrize("delta", [-0.1, float("inf")])
def test_delta_out_of_range_is_refused_with_the_key(delta):
    with pytest.raises(ValueError, match="ibo.delta"):
        IBOLossConfig(delta=delta)


def test_every_method_has_its_yaml_and_reads_datasets_the_select_stage_writes():
    yamls = {p.stem for p in (CONF / "ibo").glob("*.yaml")}
    assert yamls == set(OBJECTIVES)
    for objective in OBJECTIVES.values():
        assert set(objective.datasets) <= SELECT_DATASETS, objective.name
        assert f"method: {objective.name}" in (CONF / "ibo" / f"{objective.name}.yaml").read_text()
    assert {"npo", "simnpo", "ga_kl"} <= set(OBJECTIVES)


def _setup(method, live=False, **loss):
    model = tiny_model("gpt2", dtype=torch.float64, width=16)
    tok = chat_tokenizer(template=None)
    config = ObjectiveConfig(method=method, loss=IBOLossConfig(**loss), bregman_topk=8,
                             tokenize=TOKENS)
    objective, data = get_objective(method), rows()
    data = {k: data[k] for k in objective.datasets}
    ref = None
    if objective.needs_reference:
        base = tiny_model("gpt2", dtype=torch.float64, width=16)
        ref = Reference(base, tok, config, live=live)
        if not live:
            ref.precompute(data, "cpu", objective.reference_logp, objective.reference_topk)
            ref.model = None
    with torch.no_grad():  # the policy moves away from θs so that every term is non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, tok, ref, data, config


def _expected(method, model, tok, data, config):
    """Each method's loss written out from the operators, as the if-chain before the registry."""
    base = tiny_model("gpt2", dtype=torch.float64, width=16)

    def logp(m, name, prefix=""):
        from cluster.batches import to_tensors
        b = to_tensors(side(data[name], prefix), tok, TOKENS, "cpu")
        return sequence_log_probs(m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]
                                    ).logits, b["input_ids"], b["loss_mask"]), b

    def kl():
        from cluster.batches import to_tensors
        b = to_tensors(side(data["neutral"]), tok, TOKENS, "cpu")
        with torch.no_grad():
            ref_logits = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        values, index = topk_reference(ref_logits, 8)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return config.loss.gamma * bregman_loss(logits, values, index, b["attention_mask"]).mean()

    def ascent(weighted):
        lp, b = logp(model, "positive")
        w = torch.tensor([r["weight"] for r in data["positive"]], dtype=torch.float64)
        return ((w if weighted else 1) * lp / b["loss_mask"].sum(1)).mean()

    def tokens(m, prefix):
        from cluster.batches import to_tensors
        b = to_tensors(side(data["pairs"], prefix), tok, TOKENS, "cpu")
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return token_log_probs(logits, b["input_ids"]), b["loss_mask"], b["input_ids"]

    beta = config.loss.beta
    if method == "ibo" and config.loss.granularity == "token":
        (pos, mpos, ipos), (neg, mneg, ineg) = tokens(model, "pos_"), tokens(model, "neg_")
        if config.loss.rejected_tokens == "distinct":
            mpos = distinct_tokens(ipos, mpos, ineg, mneg)
        with torch.no_grad():
            rpos, rneg = tokens(base, "pos_")[0], tokens(base, "neg_")[0]
        eps = torch.tensor([p["eps"] for p in data["pairs"]], dtype=torch.float64)
        return token_correction_loss(pos, neg, rpos, rneg, mpos, mneg, eps, beta)[0].mean() + kl()
    if method == "ibo":
        pos, neg = logp(model, "pairs", "pos_")[0], logp(model, "pairs", "neg_")[0]
        with torch.no_grad():
            rpos, rneg = logp(base, "pairs", "pos_")[0], logp(base, "pairs", "neg_")[0]
        eps = torch.tensor([p["eps"] for p in data["pairs"]], dtype=torch.float64)
        return correction_loss(pos, neg, rpos, rneg, eps, beta)[0].mean() + kl()
    if method in ("pbo", "ga", "ga_kl"):
        return ascent(method == "pbo") + (kl() if method != "ga" else 0)
    if method == "npo":
        with torch.no_grad():
            ref = logp(base, "positive")[0]
        return npo_loss(logp(model, "positive")[0], ref, beta).mean() + kl()
    if method == "simnpo":
        lp, b = logp(model, "positive")
        return simnpo_loss(lp, b["loss_mask"].sum(1), beta, config.loss.delta).mean() + kl()
    name = "retain" if method == "remove" else "clean"
    lp, b = logp(model, name)
    return nll_loss(lp, b["loss_mask"].sum(1)).mean()


@pytest.mark.parametrize("method,loss", [
    ("ibo", {}), ("ibo", {"granularity": "token", "beta": 3.0}),
    ("ibo", {"granularity": "token", "rejected_tokens": "all"}), ("pbo", {}), ("ga", {}),
    ("remove", {}), ("oracle", {}), ("ga_kl", {}),
    ("npo", {}), ("simnpo", {"beta": 2.5, "delta": 0.2})])
def test_step_loss_of_each_method_is_its_objective(method, loss):
    model, tok, ref, data, config = _setup(method, **loss)
    got, metrics = step_loss(model, tok, ref, data, config, "cpu")
    torch.testing.assert_close(got, _expected(method, model, tok, data, config).to(got.dtype))
    assert metrics["loss"] == pytest.approx(float(got.detach()))
    # SimNPO reads no reference log-prob, but its retain term reads θs's top-k on D_IF0
    assert (ref is not None) == (method not in ("ga", "remove", "oracle"))


@pytest.mark.parametrize("method,loss", [("npo", {}),
                                         ("ibo", {"granularity": "token"})])
def test_the_live_reference_equals_the_cached_one(method, loss):
    cached = step_loss(*_setup(method, **loss), "cpu")[0]
    live = step_loss(*_setup(method, live=True, **loss), "cpu")[0]
    torch.testing.assert_close(cached, live)


def test_a_toy_objective_registered_in_one_module_is_validated_and_runs(monkeypatch):
    """Adding a method = one ``Objective`` (this module) + its YAML: config validation, the
    reference and ``step_loss`` take it from the registry."""
    from hydra import compose, initialize_config_dir

    from pipeline.config import register as register_schema
    from pipeline.config import to_typed
    from pipeline.specs import ibo_spec, validate

    def unlikelihood(step):  # toy: push the positive set's token-mean log-prob down, 2×
        batch = step.batch(side(step.rows["positive"]))
        value = 2 * (step.seq_logp(batch) / batch["loss_mask"].sum(1)).mean()
        return value, {"loss/toy": value.item()}

    register_schema()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_typed(compose("config", overrides=["ibo.method=toy", "output_dir=/tmp/o",
                                                    "cache_dir=/tmp/c"]))
    with pytest.raises(ValueError, match="ibo.method='toy'"):
        validate(cfg)
    monkeypatch.setattr(ibo_objectives, "OBJECTIVES", dict(OBJECTIVES))
    ibo_objectives.register(Objective("toy", ("positive", "neutral"),
                                      (unlikelihood, ibo_objectives.bregman_term),
                                      reference_topk=("neutral",)))
    validate(cfg)
    spec = ibo_spec(cfg, "model")
    assert spec.objective.objective.datasets == ("positive", "neutral")
    model, tok, ref, data, _ = _setup("ga_kl")  # the same datasets and reference
    config = ObjectiveConfig(method="toy", bregman_topk=8, tokenize=TOKENS)
    toy, metrics = step_loss(model, tok, ref, data, config, "cpu")
    ga_kl, ga_metrics = step_loss(model, tok, ref, data,
                                  ObjectiveConfig("ga_kl", bregman_topk=8, tokenize=TOKENS), "cpu")
    torch.testing.assert_close(toy, ga_kl + ga_metrics["loss/ascent"])
    assert metrics["loss/toy"] == pytest.approx(2 * ga_metrics["loss/ascent"])


def test_an_objective_reading_the_reference_on_a_dataset_it_does_not_read_is_refused():
    with pytest.raises(ValueError, match="objective bad"):
        Objective("bad", ("positive",), (), reference_logp=("pairs",))


def test_one_npo_step_lowers_the_forget_log_prob():
    model, tok, ref, data, config = _setup("npo")
    from cluster.batches import to_tensors
    b = to_tensors(side(data["positive"]), tok, TOKENS, "cpu")

    def forget():
        with torch.no_grad():
            return float(sequence_log_probs(model(input_ids=b["input_ids"]).logits,
                                            b["input_ids"], b["loss_mask"]).mean())

    before = forget()
    loss, _ = step_loss(model, tok, ref, data, config, "cpu")
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.5 * p.grad)
    assert forget() < before
