"""Curvature units: the pieces of a causal LM that each get one Kronecker-factored block.

LANCET.md section 2. A unit is a map from an input κ (width ``d_in``, plus 1 for a bias column)
to an output s (width ``d_out``) whose gradient for one sequence is ``DŴ = Σ_t Ds_t κ_tᵀ``.

- ``linfac``: two units per Transformer block, the attention sublayer and the feed-forward
  sublayer, each treated as one virtual linear map from the sublayer's (normed) input to its
  output before the residual add. The attention unit mixes its input over tokens with the
  head-averaged attention probabilities (``mix_tokens``).
- ``ekfac`` / ``kfac``: every linear module (``nn.Linear`` or GPT-2's ``Conv1D``) of the blocks.

A unit names an ``input_module`` (κ is read from its input) and an ``output_module`` (Ds is the
gradient of its output); they differ only for feed-forward blocks that are not one module (OPT).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from operators.errors import UserError

ATTENTION_NAMES = ("attn", "self_attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward")
SPLIT_FFN_NAMES = (("fc1", "fc2"),)


class UnsupportedModelError(UserError):
    """The model has no Transformer blocks this module knows how to cut into units."""


@dataclass(frozen=True)
class Unit:
    """One curvature block.

    Attributes:
        name: stable name, e.g. ``"h.0.attn"`` or ``"h.0.mlp.c_fc"``.
        input_module: κ is this module's first input (``hidden_states``).
        output_module: Ds is the gradient of this module's (first) output.
        d_in: input width, without the bias column.
        d_out: output width.
        bias: whether κ gets a trailing 1 (a bias column in DŴ).
        mix_tokens: attention unit: κ_t = Σ_j ā_{t,j} x_j with ā the head-averaged attention.
    """

    name: str
    input_module: nn.Module
    output_module: nn.Module
    d_in: int
    d_out: int
    bias: bool
    mix_tokens: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of DŴ: ``[d_out, d_in + bias]``."""
        return self.d_out, self.d_in + int(self.bias)


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or a Conv1D-style module (weight ``[in, out]``, attribute ``nf``)."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ == "Conv1D" and hasattr(module, "nf")
    )


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear module."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of Transformer blocks: the longest one whose items have an attention child."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if all(_child(block, ATTENTION_NAMES) is not None for block in module):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        arch = type(model).__name__
        raise UnsupportedModelError(
            f"model architecture {arch} has no recognisable Transformer blocks: looked for a "
            f"ModuleList whose blocks have an attention child named one of {ATTENTION_NAMES} "
            f"and a feed-forward child named one of {MLP_NAMES} or a pair {SPLIT_FFN_NAMES}"
        )
    return best


def discover_units(model: nn.Module, method: str, module_filter: str = "") -> list[Unit]:
    """The units of ``model`` for influence method ``method``, in block order: one per
    attention/MLP sublayer or one per linear module, as its registry entry says.

    ``module_filter`` keeps only the linear modules whose name contains it (``ekfac``/``kfac``),
    e.g. ``"lora_"`` for the adapters of a LoRA-tuned model.
    """
    from operators.methods import SUBLAYER, get_method
    kind = get_method(method).units
    if kind is None:
        raise UserError(f"influence.method={method!r} takes no gradients, so it has no units")
    prefix, blocks = find_blocks(model)
    units: list[Unit] = []
    for index, block in enumerate(blocks):
        block_name = f"{prefix}.{index}"
        if kind == SUBLAYER:
            units.extend(_sublayer_units(model, block, block_name))
        else:
            units.extend(u for u in _linear_units(block, block_name) if module_filter in u.name)
    if not units:
        raise UnsupportedModelError(f"no linear module of {type(model).__name__}'s blocks "
                                    f"matches influence.module_filter={module_filter!r}")
    return units


def uncovered_weights(model: nn.Module, units: list[Unit]) -> list[str]:
    """The blocks' weight matrices (parameters of two or more dimensions) that no unit's modules
    hold: they get no curvature and add nothing to the scores, e.g. the fused experts of a
    mixture-of-experts block under ``ekfac``, which are not linear modules."""
    covered = {id(p) for u in units for m in {u.input_module, u.output_module}
               for p in m.parameters()}
    prefix, blocks = find_blocks(model)
    return [f"{prefix}.{name}" for name, p in blocks.named_parameters()
            if p.dim() >= 2 and id(p) not in covered]


def _sublayer_units(model: nn.Module, block: nn.Module, block_name: str) -> list[Unit]:
    width = _model_width(model)
    attn_name, attn = _child(block, ATTENTION_NAMES)
    units = [Unit(f"{block_name}.{attn_name}", attn, attn, width, width, True, mix_tokens=True)]
    mlp = _child(block, MLP_NAMES)
    if mlp is not None:
        units.append(Unit(f"{block_name}.{mlp[0]}", mlp[1], mlp[1], width, width, True))
        return units
    for first, last in SPLIT_FFN_NAMES:
        if hasattr(block, first) and hasattr(block, last):
            d_in = linear_shape(getattr(block, first))[0]
            d_out = linear_shape(getattr(block, last))[1]
            unit = Unit(f"{block_name}.ffn", getattr(block, first), getattr(block, last),
                        d_in, d_out, True)
            return units + [unit]
    raise UnsupportedModelError(
        f"block {block_name} of {type(model).__name__} has attention but no feed-forward child "
        f"named one of {MLP_NAMES} or a pair {SPLIT_FFN_NAMES}"
    )


def sublayer_of(name: str) -> tuple[int, str]:
    """The block index and sublayer of a unit named by ``discover_units``: ``(layer, part)``
    with ``part`` ``"attn"`` or ``"mlp"`` (a split feed-forward pair and its ``ffn`` unit are
    ``"mlp"``), else the block's child's own name. ``"h.0.attn"`` and ``"h.0.attn.c_proj"``
    are ``(0, "attn")``; a name without a block index is ``(-1, name)``.

    The index is the first all-digit part of the name that a known sublayer follows (else the
    first all-digit part), so a MoE expert's number (``…layers.3.mlp.experts.5.w1``) is not
    taken for the layer.
    """
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts[:-1]) if p.isdigit()]
    if not digits:
        return -1, name
    mlp_like = set(MLP_NAMES) | {n for pair in SPLIT_FFN_NAMES for n in pair} | {"ffn"}
    known = [i for i in digits if parts[i + 1] in set(ATTENTION_NAMES) | mlp_like]
    index = (known or digits)[0]
    child = parts[index + 1]
    if child in ATTENTION_NAMES:
        return int(parts[index]), "attn"
    return int(parts[index]), "mlp" if child in mlp_like else child


def _linear_units(block: nn.Module, block_name: str) -> list[Unit]:
    units = []
    for name, module in block.named_modules():
        if is_linear(module):
            d_in, d_out = linear_shape(module)
            units.append(Unit(f"{block_name}.{name}", module, module, d_in, d_out,
                              module.bias is not None))
    return units


def _child(block: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for name in names:
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return name, module
    return None


def _model_width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model", "word_embed_proj_dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise UnsupportedModelError(f"cannot read the model width of {type(model).__name__}")


def conv1d_as_linear(model: nn.Module) -> nn.Module:
    """Swap GPT-2's ``Conv1D`` (weight ``[in, out]``) for equal ``nn.Linear`` modules, in place.

    For tools that only track ``nn.Linear`` (the kronfluence reference in tests and bench).
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Conv1D":
                d_in, d_out = child.weight.shape
                linear = nn.Linear(d_in, d_out, dtype=child.weight.dtype)
                linear.weight.data.copy_(child.weight.data.T)
                linear.bias.data.copy_(child.bias.data)
                setattr(parent, name, linear)
    return model
