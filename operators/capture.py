"""Hooks that capture each unit's inputs κ and output gradients Ds in one forward + backward.

LANCET.md section 2: for a padded batch ``[B, T]`` the hooks record, per unit,
``κ  [B, T, d_in (+1)]`` and ``Ds [B, T, d_out]``, zeroed on padding. From these come the
factor statistics (``A = Σ κκᵀ``, ``S = Σ Ds Dsᵀ`` over real tokens) and the per-sequence
unit gradients ``DŴ_b = Σ_t Ds_{b,t} κ_{b,t}ᵀ`` of shape ``[B, d_out, d_in (+1)]``.

κ is detached: like every Kronecker-factored method we treat a unit's input as constant.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from operators.units import Unit


class UnitRecord:
    """What the hooks saw for one unit in the last forward/backward."""

    def __init__(self) -> None:
        self.inputs: Tensor | None = None  # [B, T, d_in]
        self.attention: Tensor | None = None  # [B, T, T] head-averaged, mix_tokens units only
        self.output_grad: Tensor | None = None  # [B, T, d_out]


class Capture:
    """Registers the hooks of a list of units; read results after ``loss.backward()``.

    Use as a context manager (``with Capture(units) as cap:``) so hooks never outlive a pass.
    """

    def __init__(self, units: list[Unit]) -> None:
        self.units = units
        self.records = {unit.name: UnitRecord() for unit in units}
        self._handles: list = []

    def __enter__(self) -> Capture:
        for unit in self.units:
            record = self.records[unit.name]
            self._handles.append(unit.input_module.register_forward_pre_hook(
                _input_hook(record), with_kwargs=True))
            self._handles.append(unit.output_module.register_forward_hook(
                _output_hook(record, unit.mix_tokens)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def kappa(self, unit: Unit, token_mask: Tensor) -> Tensor:
        """κ ``[B, T, d_in (+1)]`` in float64-or-input dtype, zeroed where ``token_mask`` is 0."""
        record = self.records[unit.name]
        if record.inputs is None:
            raise RuntimeError(f"unit {unit.name} saw no forward pass")
        x = record.inputs.reshape(*token_mask.shape, -1)  # some models (OPT) flatten [B*T, d]
        if unit.mix_tokens:
            if record.attention is None:
                raise RuntimeError(
                    f"unit {unit.name} returned no attention probabilities: load the model with "
                    "attn_implementation='eager' for linfac")
            x = torch.bmm(record.attention.to(x.dtype), x)
        if unit.bias:
            x = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        return _masked(x, token_mask)

    def output_grad(self, unit: Unit, token_mask: Tensor) -> Tensor:
        """Ds ``[B, T, d_out]``, zeroed where ``token_mask`` is 0."""
        grad = self.records[unit.name].output_grad
        if grad is None:
            raise RuntimeError(f"unit {unit.name} received no gradient: call backward first")
        return _masked(grad.reshape(*token_mask.shape, -1), token_mask)


def _masked(t: Tensor, token_mask: Tensor) -> Tensor:
    """Zero the masked positions (``where``, not a product: padding may hold NaN or inf)."""
    return torch.where(token_mask.unsqueeze(-1).bool(), t, torch.zeros_like(t))


def _input_hook(record: UnitRecord):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        record.inputs = hidden.detach()
        record.output_grad = None
    return hook


def _output_hook(record: UnitRecord, wants_attention: bool):
    def hook(module: nn.Module, args: tuple, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        if wants_attention and isinstance(output, tuple) and len(output) > 1:
            weights = output[1]
            record.attention = None if weights is None else weights.detach().mean(dim=1)
        if out.requires_grad:
            out.register_hook(_grad_setter(record))
    return hook


def _grad_setter(record: UnitRecord):
    def setter(grad: Tensor) -> None:
        record.output_grad = grad.detach()
    return setter


def unit_gradient(cap: Capture, unit: Unit, token_mask: Tensor) -> Tensor:
    """One unit's per-sequence gradients ``DŴ = Σ_t Ds_t κ_tᵀ``: ``[B, d_out, d_in (+1)]``.

    Summed in float32 (float64 for a float64 model): a bfloat16 pass is upcast first.
    """
    grad, kappa = cap.output_grad(unit, token_mask), cap.kappa(unit, token_mask)
    dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return torch.einsum("bto,bti->boi", grad.to(dtype), kappa.to(dtype))


def unit_gradients(cap: Capture, units: list[Unit], token_mask: Tensor) -> dict[str, Tensor]:
    """Per-sequence unit gradients of every unit: name -> ``[B, d_out, d_in (+1)]``."""
    return {unit.name: unit_gradient(cap, unit, token_mask) for unit in units}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Deterministic forward passes (no dropout) for influence; restores the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
