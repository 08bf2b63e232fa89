"""Hook-captured per-sequence gradients against autograd on each sequence alone."""

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
