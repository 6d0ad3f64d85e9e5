"""Which Shapes train on each batch (the sandwich rule and its variants).

    sandwich   the largest and the smallest Shape of the space, and n random grid Shapes
    grid       the largest, and one random Shape from each of n bins uniform in parameters
    fixed      the largest, and a given list of Shapes
    largest    the largest alone (continued training of one model)

Given Shapes join every step of sandwich and grid too (e.g. the members of a family, trained
on every batch while the random draws cover the sizes between them).

The largest Shape comes first: it is the in-place teacher. The choice is a pure function of
(seed, step), so a resumed run samples exactly what an uninterrupted one does, with no state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from anyshape.errors import AnyshapeError
from anyshape.search.space import SearchSpace
from anyshape.shape import Shape

SAMPLING = ("sandwich", "grid", "fixed", "largest")


@dataclass
class ShapeSampler:
    """`shapes(step)` -> [(slot, Shape)], the largest first, each Shape once; a slot names the
    Shape's role (largest, smallest, random-i, bin-i, fixed-i) for per-slot statistics such as
    loss balancing and the progress bar."""

    space: SearchSpace
    rule: str = "sandwich"
    count: int = 2  # random Shapes (sandwich) or parameter bins (grid)
    fixed: Sequence[Shape] = ()
    seed: int = 0
    grid: list[Shape] = field(init=False)  # every Shape of the space
    bins: list[list[Shape]] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.rule not in SAMPLING:
            raise AnyshapeError(f"unknown sampling {self.rule!r}; choose one of {', '.join(SAMPLING)}")
        if self.rule == "fixed" and not self.fixed:
            raise AnyshapeError("--sampling fixed needs the Shapes to train: pass --shapes shapes.json")
        if self.count < (1 if self.rule == "grid" else 0):
            raise AnyshapeError(
                f"{self.rule} sampling needs {'at least 1 bin' if self.rule == 'grid' else '0 or more random Shapes'}"
                f", got {self.count}"
            )
        for shape in self.fixed:
            shape.validate(self.space.config)
        self.grid = list(self.space.shapes())
        if self.rule == "grid":
            self.bins = parameter_bins(self.space, self.count)

    def shapes(self, step: int) -> list[tuple[str, Shape]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        chosen = [("largest", self.space.largest())]
        if self.rule == "sandwich":
            chosen.append(("smallest", self.space.smallest()))
            for i in range(self.count):
                index = int(torch.randint(len(self.grid), (1,), generator=generator))
                chosen.append((f"random-{i}", self.grid[index]))
        elif self.rule == "grid":
            for i, members in enumerate(self.bins):
                if members:
                    chosen.append((f"bin-{i}", members[int(torch.randint(len(members), (1,), generator=generator))]))
        if self.rule != "largest":
            chosen += [(f"fixed-{i}", shape) for i, shape in enumerate(self.fixed)]
        firsts = {}
        for slot, shape in chosen:  # a Shape drawn twice trains once, in its first slot
            firsts.setdefault(shape, slot)
        return [(slot, shape) for shape, slot in firsts.items()]


def parameter_bins(space: SearchSpace, count: int) -> list[list[Shape]]:
    """The space's Shapes in `count` bins of equal width in parameters, between the smallest
    and the largest Shape; a bin may be empty."""
    shapes = list(space.shapes())
    params = [shape.num_parameters(space.config) for shape in shapes]
    low, high = min(params), max(params)
    bins: list[list[Shape]] = [[] for _ in range(count)]
    for shape, value in zip(shapes, params, strict=True):
        bins[min(count - 1, int((value - low) / (high - low + 1) * count))].append(shape)
    return bins
