"""Hook-captured per-sequence gradients against autograd on each sequence alone."""

import math

import pytest
import torch
from tiny_models import FAMILIES, random_batch, slice_batch, tiny_model
from torch import nn

from operators.curvature import batch_gradients
from operators.sequences import sequence_losses
from operators.units import discover_units


def true_weight_grad(model, module, batch):
    """d(−log p)/dW of one linear module as ``[d_out, d_in (+1)]`` via plain autograd."""
    model.zero_grad()
    sequence_losses(model, batch).sum().backward()
    weight = module.weight.grad
    grad = weight if isinstance(module, nn.Linear) else weight.T  # Conv1D is [in, out]
    if module.bias is not None:
        grad = torch.cat([grad, module.bias.grad.unsqueeze(1)], dim=1)
    return grad


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_unit_gradients_equal_autograd_per_sequence(family):
    model = tiny_model(family)
    units = discover_units(model, "ekfac")
    batch = random_batch(batch=3)
    grads = batch_gradients(model, units, batch)
    for row in range(3):
        single = slice_batch(batch, [row])
        for unit in units:
            expected = true_weight_grad(model, unit.output_module, single)
            torch.testing.assert_close(grads[unit.name][row], expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cap", [3.0, 1e4])
def test_logodds_capped_gradients_equal_autograd_of_the_capped_log_odds(cap):
    """influence.logodds_cap: a token's gradient is min(1, c (1 − p)) times that of its
    log-odds log(p / (1 − p)), computed here by autograd on the log-odds themselves."""
    model = tiny_model(FAMILIES[0])
    units = discover_units(model, "ekfac")
    batch = random_batch(batch=2)
    grads = batch_gradients(model, units, batch, logodds_cap=cap)
    plain = batch_gradients(model, units, batch)
    for row in range(2):
        single = slice_batch(batch, [row])
        for unit in units:
            model.zero_grad()
            logits = model(input_ids=single["input_ids"],
                           attention_mask=single["attention_mask"]).logits[:, :-1]
            logp = torch.log_softmax(logits, -1).gather(
                -1, single["input_ids"][:, 1:, None]).squeeze(-1)
            odds = logp - torch.log1p(-logp.exp())  # log(p / (1 − p))
            scale = torch.clamp(cap * (1 - logp.exp()), max=1.0).detach()
            (-(odds * scale * single["loss_mask"][:, 1:]).sum()).backward()
            module = unit.output_module
            weight = module.weight.grad if isinstance(module, nn.Linear) else module.weight.grad.T
            expected = (torch.cat([weight, module.bias.grad.unsqueeze(1)], dim=1)
                        if module.bias is not None else weight)
            torch.testing.assert_close(grads[unit.name][row], expected, rtol=1e-7, atol=1e-12)
    assert not torch.allclose(grads[units[0].name], plain[units[0].name])


def test_logodds_weights_are_exact_for_memorised_tokens_and_stay_finite():
    from operators.sequences import logodds_weights
    logp = torch.tensor([[0.0, -1e-12, -1e-3, -0.7, -50.0, float("nan")]], dtype=torch.float64)
    w = logodds_weights(logp, 10.0)
    expected = [10.0, 10.0, 10.0, 1 / (1 - math.exp(-0.7)), 1.0, 10.0]
    torch.testing.assert_close(w, torch.tensor([expected], dtype=torch.float64), rtol=1e-9, atol=0)
    assert torch.equal(logodds_weights(logp, 1.0)[:, :5], torch.ones(1, 5, dtype=torch.float64))


@pytest.mark.parametrize("family", FAMILIES)
def test_linfac_gradients_do_not_depend_on_the_batch(family):
    model = tiny_model(family)
    units = discover_units(model, "linfac")
    batch = random_batch(batch=4)
    together = batch_gradients(model, units, batch)
    for row in range(4):
        alone = batch_gradients(model, units, slice_batch(batch, [row]))
        for unit in units:
            torch.testing.assert_close(together[unit.name][row], alone[unit.name][0],
                                       rtol=1e-9, atol=1e-12)


def test_linfac_unit_that_is_one_linear_map_equals_its_weight_gradient():
    model = tiny_model("gpt2")
    for block in model.transformer.h:
        block.mlp = nn.Linear(16, 16).double()  # the feed-forward sublayer is one real linear map
    units = [u for u in discover_units(model, "linfac") if not u.mix_tokens]
    batch = random_batch(batch=3)
    grads = batch_gradients(model, units, batch)
    for row in range(3):
        single = slice_batch(batch, [row])
        for unit in units:
            expected = true_weight_grad(model, unit.output_module, single)
            torch.testing.assert_close(grads[unit.name][row], expected, rtol=1e-9, atol=1e-12)


def test_loss_mask_limits_the_gradient_to_response_tokens():
    model = tiny_model("gpt2")
    units = discover_units(model, "linfac")
    batch = random_batch(batch=2)
    batch["loss_mask"].zero_()
    grads = batch_gradients(model, units, batch)
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_influence_over_lora_adapters_only():
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(tiny_model("llama"), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model = model.double()
    units = discover_units(model, "ekfac", module_filter="lora_")
    assert units and all("lora_" in u.name for u in units)
    assert len(units) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    batch = random_batch(batch=2)
    grads = batch_gradients(model, units, batch)
    for row in range(2):
        single = slice_batch(batch, [row])
        for unit in units:
            expected = true_weight_grad(model, unit.output_module, single)
            torch.testing.assert_close(grads[unit.name][row], expected, rtol=1e-9, atol=1e-12)
