"""Single-axis heuristics at a parameter budget (LLaMaFlex Table C4): shrink one axis only.

    mlp-only     the largest intermediate_size F' that fits the budget
    hidden-only  the largest hidden_size H' that fits
    depth-only   the largest depth n that fits, keeping the n best-ranked layers
None where shrinking that axis alone cannot reach the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from anyshape.model.config import LlamaFamilyConfig
from anyshape.search.space import DEFAULT_ALIGN, aligned_widths
from anyshape.shape import Shape

HEURISTICS = ("mlp-only", "hidden-only", "depth-only")


def single_axis_shapes(
    config: LlamaFamilyConfig,
    max_params: float,
    embeddings: bool,
    layer_ranking: Sequence[int],
    align: int = DEFAULT_ALIGN,
) -> dict[str, Shape | None]:
    """The largest Shape of each heuristic with at most `max_params` parameters
    (`embeddings=False`: counted without the embedding matrices), widths multiples of `align`."""
    full = Shape.full(config)

    def fits(shape: Shape) -> bool:
        return shape.num_parameters(config, embeddings) <= max_params

    def largest(candidates: list[Shape]) -> Shape | None:  # candidates from largest to smallest
        return next((shape for shape in candidates if fits(shape)), None)

    return {
        "mlp-only": largest(
            [replace(full, intermediate_size=f) for f in aligned_widths(config.intermediate_size, align)]
        ),
        "hidden-only": largest([replace(full, hidden_size=h) for h in aligned_widths(config.hidden_size, align)]),
        "depth-only": largest(
            [replace(full, layers=tuple(sorted(layer_ranking[:n]))) for n in range(config.num_hidden_layers, 0, -1)]
        ),
    }
