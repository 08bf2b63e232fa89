"""The influence methods, one entry each: what a method reads and needs.

Every stage asks this table, never the method's name: which units the gradients are taken over,
whether factors are fitted and applied, whether the eigenvalues are refitted, whether attention
weights are captured, how the two sides are compared. Adding a method is one entry here plus its
YAML under ``conf/influence/`` (tests/test_methods.py registers a toy one and runs it).
"""

from __future__ import annotations

from dataclasses import dataclass

from operators.errors import UserError

SUBLAYER, LINEAR = "sublayer", "linear"


@dataclass(frozen=True)
class InfluenceMethod:
    """One way to score a training sample against the queries."""

    name: str
    # which units the gradients are taken over: one per attention/MLP sublayer (LinFAC), one per
    # linear module, or None (no gradients: the last hidden state, RepSim)
    units: str | None
    curvature: bool  # precondition the queries with fitted factors (an IHVP)
    eigen_correction: bool = False  # refit the eigenvalues in the Kronecker eigenbasis (λ pass)
    # cosine of the two sides: always, never, or as ``influence.similarity`` says (None)
    cosine: bool | None = False

    def __post_init__(self) -> None:
        if self.units not in (SUBLAYER, LINEAR, None):
            raise ValueError(f"method {self.name}: units={self.units!r}, expected "
                             f"{SUBLAYER!r}, {LINEAR!r} or None")
        if self.curvature and self.units is None:
            raise ValueError(f"method {self.name}: curvature needs gradient units")

    @property
    def attention_weights(self) -> bool:
        """Whether the attention sublayer's unit reads the attention weights (LinFAC)."""
        return self.units == SUBLAYER

    def is_cosine(self, similarity: str) -> bool:
        return self.cosine if self.cosine is not None else similarity == "cosine"


METHODS: dict[str, InfluenceMethod] = {}


def register(method: InfluenceMethod) -> InfluenceMethod:
    METHODS[method.name] = method
    return method


# The curvature methods take influence.similarity too: cosine unit-normalises the preconditioned
# query and the training gradient (normalised influence, as in RelatIF/TrackStar); dot is raw.
register(InfluenceMethod("linfac", SUBLAYER, curvature=True, eigen_correction=True, cosine=None))
register(InfluenceMethod("ekfac", LINEAR, curvature=True, eigen_correction=True, cosine=None))
register(InfluenceMethod("kfac", LINEAR, curvature=True, cosine=None))
register(InfluenceMethod("gradsim", LINEAR, curvature=False, cosine=None))
register(InfluenceMethod("repsim", None, curvature=False, cosine=True))


def get_method(name: str) -> InfluenceMethod:
    """The method called ``name``; an unknown name fails naming the config key."""
    if name not in METHODS:
        raise UserError(f"influence.method={name!r}: expected one of {tuple(METHODS)}")
    return METHODS[name]
