"""Parameter budgets: what a router is asked for.

A budget is a fraction in (0, 1] of the parent's parameters, counted on a basis: `total` (every
parameter of the exported model) or `non-embedding` (without the embedding and LM head
matrices). An absolute count with a K, M or B suffix (`60M`) is converted to that fraction.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from anyshape.errors import AnyshapeError
from anyshape.model.config import LlamaFamilyConfig
from anyshape.shape import Shape

BASES = ("total", "non-embedding")
SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9}


def check_basis(basis: str) -> str:
    if basis not in BASES:
        raise AnyshapeError(f"unknown budget basis {basis!r}; choose one of {', '.join(BASES)}")
    return basis


def parent_parameters(config: LlamaFamilyConfig, basis: str) -> int:
    """The parent's parameters on `basis`."""
    return Shape.full(config).num_parameters(config, embeddings=check_basis(basis) == "total")


def check_fraction(fraction: float, what: str = "budget") -> float:
    if not 0 < fraction <= 1:
        raise AnyshapeError(
            f"{what} {fraction:g} is outside (0, 1]; give a fraction of the parent's parameters such as 0.4, "
            "or an absolute count such as 60M"
        )
    return fraction


@dataclass(frozen=True)
class Budget:
    fraction: float  # of the parent's parameters on `basis`
    basis: str = "total"

    def parameters(self, config: LlamaFamilyConfig) -> float:
        return self.fraction * parent_parameters(config, self.basis)

    @classmethod
    def parse(cls, text: str, config: LlamaFamilyConfig, basis: str = "total") -> Budget:
        """'0.4' (a fraction) or '60M' (a count: K, M, B) -> a Budget on `basis`."""
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMBkmb]?)\s*", text)
        if match is None:
            raise AnyshapeError(f"budget {text!r} is not a number; give a fraction such as 0.4 or a count such as 60M")
        value, suffix = float(match[1]), match[2].upper()
        if not suffix:
            return cls(check_fraction(value), check_basis(basis))
        count, parent = value * SUFFIXES[suffix], parent_parameters(config, basis)
        if count > parent:
            raise AnyshapeError(
                f"budget {text} is more than the parent's {parent:,} parameters ({basis}); ask for at most {parent:,}"
            )
        return cls(check_fraction(count / parent), basis)


def parse_anchors(text: str | Sequence[float]) -> tuple[float, ...]:
    """'0.25,0.5,0.75,1' -> (0.25, 0.5, 0.75, 1.0): the budgets a router trains at, each in (0, 1]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()] if isinstance(text, str) else list(text)
    except ValueError:
        raise AnyshapeError(f"anchors {text!r} must be comma-separated fractions, e.g. 0.25,0.5,0.75,1") from None
    if len(set(values)) < 2:
        raise AnyshapeError(f"anchors {text!r}: give at least two different budgets, e.g. 0.25,0.5,0.75,1")
    return tuple(sorted({check_fraction(value, "anchor") for value in values}))
