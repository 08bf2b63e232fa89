"""Per-sublayer dependence: which sublayers the top-ranked samples' responses rely on (issue #17).

The influence shares (``operators.attribution``) answer where up-weighting a sample would act at
the final weights, which is not where a behaviour was learned (docs/METHOD.md section 3). This
asks the model directly, by mean-ablation: replace one sublayer's output at every position by its
mean over a contrast set of ordinary samples, and see how much each sample's response loses.

    Δ_m(z)  = ℓ_m(z) − ℓ(z)       ℓ: the mean −log p per response token (the loss mask);
                                   ℓ_m: the same with sublayer m's output ablated
    p_m(z)  = the share of a contrast set C of ordinary rows with Δ_m(c) below Δ_m(z)
    r_m     = the share of the top rows with p_m(z) > 0.95   (ordinary rows: 0.05)

Ablating an early sublayer costs every row, and rows with rare tokens (which planted text often
has) most, with a heavy tail; so a row is compared with ordinary rows' losses rank-wise, and a
sublayer's reliance r_m counts the top rows that lose more than nearly every ordinary row does.
The mean of Δ_m(z) − mean_C Δ_m, or its z-score, was pulled to the first block by the tail
(docs/METHOD.md section 3).

The sublayers are the attention and feed-forward modules of every block (``discover_units``'s
``linfac`` units), whatever the influence method: the question is about the model, not about the
method's curvature blocks. Cost: (1 + |sublayers|) forward passes over the samples and C, and
one over C for the means.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from operators.sequences import token_log_probs
from operators.units import discover_units

LEVEL = 0.95  # a row relies on a sublayer when it loses more than this share of ordinary rows


def sublayers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every block's attention and feed-forward sublayer, in block order; the
    module's first output is what the block adds to its residual stream."""
    return [(u.name, u.output_module) for u in discover_units(model, "linfac")]


def response_losses(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """``[B]``: each sequence's mean −log p over its loss mask (its response), float64."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    picked = token_log_probs(logits, batch["input_ids"]).double()  # aligned to positions
    mask = batch["loss_mask"].bool()
    total = torch.where(mask, picked, torch.zeros_like(picked)).sum(dim=1)
    return -total / mask.sum(dim=1).clamp(min=1)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def output_means(model: nn.Module, modules: list[nn.Module], batches: list[dict[str, Tensor]]
                 ) -> list[Tensor]:
    """Each module's mean first output over the real (unpadded) tokens of ``batches``: ``[d]``
    per module, float64 (``ablated`` casts it to the output's dtype)."""
    sums: list[Tensor | None] = [None] * len(modules)
    mask: list[Tensor] = []

    def hook(index):
        def record(module, args, output):
            # [B, T, d], or [B·T, d] where a block flattens its tokens (OPT's feed-forward)
            out = _first(output).reshape(-1, _first(output).shape[-1])
            part = (out.double() * mask[0].reshape(-1, 1)).sum(dim=0)
            sums[index] = part if sums[index] is None else sums[index] + part
        return record

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    count = 0
    try:
        for batch in batches:
            mask[:] = [batch["attention_mask"].double()]
            count += int(batch["attention_mask"].sum())
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return [s / max(count, 1) for s in sums]


@contextmanager
def ablated(module: nn.Module, mean: Tensor) -> Iterator[None]:
    """Within the block, ``module``'s first output is ``mean`` at every position."""
    def replace(mod, args, output):
        out = _first(output)
        new = mean.to(out.dtype).expand_as(out).clone()
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def loss_increases(model: nn.Module, modules: list[nn.Module], means: list[Tensor],
                   batches: list[dict[str, Tensor]]) -> Tensor:
    """``[N, M]``: each sequence's response-loss increase with each module ablated in turn
    (Δ_m above), float64; N = the rows of ``batches`` in order."""
    base = torch.cat([response_losses(model, b) for b in batches])
    columns = []
    for module, mean in zip(modules, means):
        with ablated(module, mean):
            columns.append(torch.cat([response_losses(model, b) for b in batches]) - base)
    return torch.stack(columns, dim=1)


def percentiles(values: Tensor, reference: Tensor) -> Tensor:
    """``[N, M]``: where each value falls among ``reference``'s ``[C, M]`` of the same column,
    in [0, 1] (the share of the reference below it, ties counted half)."""
    below = (reference[None] < values[:, None]).double().mean(dim=1)
    tied = (reference[None] == values[:, None]).double().mean(dim=1)
    return below + tied / 2


def reliance(percentile: Tensor, level: float = LEVEL) -> Tensor:
    """``[M]``: the share of rows whose loss increase is above ``level`` of the ordinary rows'
    (``percentile`` ``[N, M]``); ``1 − level`` is what ordinary rows would give."""
    return (percentile > level).double().mean(dim=0)


def dependence(model: nn.Module, batches: list[dict[str, Tensor]],
               contrast: list[dict[str, Tensor]]) -> tuple[list[str], Tensor]:
    """(sublayer names, ``[N, M]`` percentiles): for each row of ``batches`` and each sublayer,
    where the row's loss increase under the sublayer's mean-ablation falls among the
    ``contrast`` rows' (which also give the means; at least one of them must have a response
    token)."""
    named = sublayers(model)
    modules = [m for _, m in named]
    was_training = model.training
    model.eval()
    try:
        means = output_means(model, modules, contrast)
        ordinary = loss_increases(model, modules, means, contrast)
        found = loss_increases(model, modules, means, batches)
    finally:
        model.train(was_training)
    return [n for n, _ in named], percentiles(found, ordinary)
