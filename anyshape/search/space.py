"""The search space: a grid of sizes for every elastic axis of a parent model.

Axes, each a fraction of the parent's size (rounded, at least 1, duplicates removed):
    num_hidden_layers    depth n; which n layers: `layer_sets[n]` (from depth selection)
    hidden_size          H'
    num_key_value_heads  G'
    queries_per_group    q'; a Shape's num_attention_heads is G' q'
    intermediate_size    F'
Every point of the grid is a valid, uniform Shape. The widths H' and F' are rounded to multiples
of `align` (32 by default: llama.cpp quantises rows in blocks of 32 values and stores a matrix
whose rows are not whole blocks unquantised, so an unaligned Shape deploys larger and slower).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from anyshape.errors import ShapeError
from anyshape.model.config import LlamaFamilyConfig
from anyshape.shape import Shape

DEFAULT_FRACTIONS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
DEFAULT_ALIGN = 32
WIDTH_AXES = ("hidden_size", "intermediate_size")
AXES = ("num_hidden_layers", "hidden_size", "num_key_value_heads", "queries_per_group", "intermediate_size")


def parse_fractions(text: str) -> tuple[float, ...]:
    """'0.25,0.5,1' -> (0.25, 0.5, 1.0); each fraction in (0, 1]."""
    try:
        values = tuple(sorted({float(part) for part in text.split(",") if part.strip()}))
    except ValueError:
        raise ShapeError(f"fractions {text!r} must be comma-separated numbers, e.g. 0.25,0.5,0.75,1") from None
    if not values or not all(0 < value <= 1 for value in values):
        raise ShapeError(f"fractions {text!r} must each be in (0, 1], e.g. 0.25,0.5,0.75,1")
    return values


def aligned(size: float, parent: int, align: int) -> int:
    """`size` rounded to the nearest multiple of `align`, within [align, parent]; the parent's own
    size is allowed as it is (aligned or not), and a parent narrower than `align` is not aligned."""
    if parent <= align:
        return max(1, min(parent, round(size)))
    return min(parent, max(align, align * round(size / align)))


def aligned_widths(parent: int, align: int) -> list[int]:
    """Every width a Shape may take on an axis of `parent` units, largest first."""
    if parent <= align:
        return list(range(parent, 0, -1))
    return [parent, *(w for w in range(parent - parent % align, 0, -align) if w != parent)]


def layer_sets_from_ranking(ranking: Sequence[int], depths: Sequence[int]) -> dict[int, tuple[int, ...]]:
    """Kept layers per depth n: the n best-ranked layers (most important first), in model order."""
    return {n: tuple(sorted(ranking[:n])) for n in depths}


@dataclass(frozen=True)
class SearchSpace:
    """`options[axis]` lists the sizes of each axis in ascending order; `layer_sets[n]` are the
    layers kept at depth n (for every n in options['num_hidden_layers'])."""

    config: LlamaFamilyConfig
    options: Mapping[str, tuple[int, ...]]
    layer_sets: Mapping[int, tuple[int, ...]]

    @classmethod
    def from_fractions(
        cls,
        config: LlamaFamilyConfig,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        layer_ranking: Sequence[int] | None = None,
        align: int = DEFAULT_ALIGN,
    ) -> SearchSpace:
        """The grid of `fractions` on every axis, widths as multiples of `align`; depth n keeps the
        n best layers of `layer_ranking` (most important first), or the first n when it is None."""
        if align < 1:
            raise ShapeError(f"align={align} must be at least 1 (1: widths of any size)")
        sizes = {
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_key_value_heads": config.num_key_value_heads,
            "queries_per_group": config.queries_per_group,
            "intermediate_size": config.intermediate_size,
        }
        options = {
            axis: tuple(
                sorted(
                    {
                        aligned(f * size, size, align) if axis in WIDTH_AXES else max(1, round(f * size))
                        for f in fractions
                    }
                )
            )
            for axis, size in sizes.items()
        }
        ranking = list(layer_ranking) if layer_ranking is not None else list(range(config.num_hidden_layers))
        if sorted(ranking) != list(range(config.num_hidden_layers)):
            raise ShapeError(
                f"the layer ranking must list each of the {config.num_hidden_layers} layers once, got {ranking}"
            )
        return cls(config, options, layer_sets_from_ranking(ranking, options["num_hidden_layers"]))

    def __len__(self) -> int:
        return math.prod(len(values) for values in self.options.values())

    def shape(self, choice: Mapping[str, int]) -> Shape:
        """The Shape of one grid point, `choice[axis]` being one of `options[axis]`."""
        groups, per_group = choice["num_key_value_heads"], choice["queries_per_group"]
        return Shape(
            layers=self.layer_sets[choice["num_hidden_layers"]],
            hidden_size=choice["hidden_size"],
            num_attention_heads=groups * per_group,
            num_key_value_heads=groups,
            intermediate_size=choice["intermediate_size"],
        )

    def choices(self) -> Iterator[dict[str, int]]:
        """Every grid point, in a fixed order."""
        for values in itertools.product(*(self.options[axis] for axis in AXES)):
            yield dict(zip(AXES, values, strict=True))

    def shapes(self) -> Iterator[Shape]:
        return (self.shape(choice) for choice in self.choices())

    def smallest(self) -> Shape:
        return self.shape({axis: values[0] for axis, values in self.options.items()})

    def largest(self) -> Shape:
        return self.shape({axis: values[-1] for axis, values in self.options.items()})

    def to_dict(self) -> dict[str, Any]:
        return {
            "options": {axis: list(self.options[axis]) for axis in AXES},
            "layer_sets": {str(n): list(layers) for n, layers in self.layer_sets.items()},
            "size": len(self),
        }
