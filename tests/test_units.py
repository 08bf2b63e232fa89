import pytest
from tiny_models import FAMILIES, tiny_model
from torch import nn

from operators.units import UnsupportedModelError, discover_units


@pytest.mark.parametrize("family", FAMILIES)
def test_linfac_has_two_sublayer_units_per_block(family):
    model = tiny_model(family, layers=2)
    units = discover_units(model, "linfac")
    assert len(units) == 4
    assert [u.mix_tokens for u in units] == [True, False, True, False]
    assert all(u.shape == (16, 17) for u in units)


@pytest.mark.parametrize("family", FAMILIES)
def test_ekfac_covers_every_linear_module_of_the_blocks(family):
    model = tiny_model(family, layers=2)
    units = discover_units(model, "ekfac")
    per_block = len(units) // 2
    assert per_block >= 4  # q/k/v or fused qkv, out, and at least two feed-forward maps
    assert all(u.input_module is u.output_module for u in units)


def test_unknown_architecture_is_named_in_the_error():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4)])

    with pytest.raises(UnsupportedModelError, match="Toy.*attention child"):
        discover_units(Toy(), "linfac")


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="influence.method"):
        discover_units(tiny_model("gpt2"), "lissa")
