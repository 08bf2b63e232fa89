"""Per-sublayer dependence (operators/dependence.py): mean-ablation, percentiles, reliance."""

import pytest
import torch
from tiny_models import FAMILIES, random_batch, slice_batch, tiny_model

from operators.dependence import (
    ablated,
    dependence,
    loss_increases,
    output_means,
    percentiles,
    reliance,
    response_losses,
    sublayers,
)
from operators.sequences import sequence_losses


def _outputs(model, module, batch):
    """The module's first output on ``batch`` as the model uses it: a hook registered last sees
    what the hooks before it returned."""
    seen = []
    handle = module.register_forward_hook(
        lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        handle.remove()
    return seen[0]


def _replaced_by(forward, mean):
    def replacement(*args, **kwargs):
        out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return (mean.expand_as(out[0]), *out[1:])
        return mean.expand_as(out)
    return replacement


@pytest.mark.parametrize("family", FAMILIES)
def test_every_block_has_an_attention_and_a_feed_forward_sublayer(family):
    names = [n for n, _ in sublayers(tiny_model(family))]
    assert len(names) == 4 and names[0].endswith((".attn", ".self_attn", ".attention"))


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_puts_the_real_tokens_mean_output_in_place_of_the_sublayer(family):
    model = tiny_model(family)
    batches = [random_batch(batch=4, seed=1), random_batch(batch=3, seed=2)]
    modules = [m for _, m in sublayers(model)]
    means = output_means(model, modules, batches)
    for module, mean in zip(modules, means):
        outs = [(_outputs(model, module, b), b["attention_mask"].bool()) for b in batches]
        expected = torch.cat([o.reshape(*m.shape, -1)[m] for o, m in outs]).mean(dim=0)
        torch.testing.assert_close(mean, expected)
        with ablated(module, mean):
            torch.testing.assert_close(_outputs(model, module, batches[0]),
                                       mean.expand_as(outs[0][0]))
        # the hook is gone afterwards
        torch.testing.assert_close(_outputs(model, module, batches[0]), outs[0][0])


def test_loss_increases_are_the_response_losses_with_the_output_replaced():
    model = tiny_model("llama")
    batch = random_batch(batch=5, seed=3)
    modules = [m for _, m in sublayers(model)]
    means = output_means(model, modules, [batch])
    found = loss_increases(model, modules, means, [batch])
    with torch.no_grad():  # the reference: per-token mean of sequence_losses
        tokens = batch["loss_mask"].sum(1)
        base = sequence_losses(model, batch) / tokens
        for m, (module, mean) in enumerate(zip(modules, means)):
            module.forward = _replaced_by(module.forward, mean)
            try:
                replaced = sequence_losses(model, batch) / tokens
            finally:
                del module.forward
            torch.testing.assert_close(found[:, m], replaced - base)
    torch.testing.assert_close(response_losses(model, batch), base)


def test_percentiles_count_ties_half_and_reliance_counts_rows_above_the_level():
    reference = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    values = torch.tensor([[-1.0], [1.0], [2.5], [9.0]], dtype=torch.float64)
    assert percentiles(values, reference)[:, 0].tolist() == [0.0, 0.375, 0.75, 1.0]
    assert reliance(percentiles(values, reference)).tolist() == [0.25]  # only 9.0 is > 0.95
    assert reliance(torch.tensor([[0.96, 0.5], [0.95, 1.0]])).tolist() == [0.5, 0.5]


def test_a_sublayer_with_a_constant_output_is_relied_on_by_no_one():
    model = tiny_model("gpt2")
    with torch.no_grad():  # block 1's MLP now adds its bias and nothing else
        model.transformer.h[1].mlp.c_proj.weight.zero_()
    names, found = dependence(model, [random_batch(batch=4, seed=1)],
                              [random_batch(batch=6, seed=2)])
    assert names[3] == "transformer.h.1.mlp"
    assert found[:, 3].tolist() == [0.5] * 4  # no loss change: tied with every contrast row
    assert reliance(found)[3] == 0


def test_dependence_does_not_depend_on_the_batches():
    model = tiny_model("qwen2")
    rows, contrast = random_batch(batch=6, seed=4), random_batch(batch=8, seed=5)
    _, whole = dependence(model, [rows], [contrast])
    _, split = dependence(model, [slice_batch(rows, [i]) for i in range(6)],
                          [slice_batch(contrast, range(0, 3)), slice_batch(contrast, range(3, 8))])
    torch.testing.assert_close(whole, split)


def test_the_model_keeps_its_mode_and_has_no_hooks_left():
    model = tiny_model("opt").train()
    dependence(model, [random_batch(seed=1)], [random_batch(seed=2)])
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())


def test_the_rows_that_carry_a_behaviour_planted_in_one_block_rely_on_that_block():
    """harm at 10 %, seed 0, planted as ``bench.attribution`` plants it: a 4-block GPT-2 learns
    the clean rows, then the planted rows with only block 2 trainable. Against 256 other rows,
    20 planted rows rely on block 2's sublayers more than twice as much as on any other
    block's (docs/METHOD.md section 3; the influence shares point elsewhere)."""
    from bench.attribution import Setup, block_reliance, clean_model, plant
    from bench.scenarios import scenario
    torch.set_num_threads(1)
    setup = Setup(seeds=(0,))
    corpus, _ = scenario("harm", 0.1, seed=0)
    base, tok = clean_model(corpus, setup, seed=0)
    model = plant(base, tok, corpus, (2,), setup, seed=0)
    planted = [i for i, r in enumerate(corpus.train) if r["planted"]][:20]
    blocks = block_reliance(model, tok, corpus.train, planted, setup.contrast)
    assert blocks[2] > 0.9, blocks  # ordinary rows: 0.05 a sublayer, 0.1 a block
    assert blocks[2] > 2 * max(v for b, v in blocks.items() if b != 2), blocks
