"""Pareto fronts of minimisation objectives, and their plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is no worse than b in every objective and better in one (all minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def non_dominated(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (duplicates all kept), in input order."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def plot_front(
    points: Sequence[dict[str, float]],
    front: Sequence[dict[str, float]],
    costs: Sequence[str],
    quality: str,
    path: Path,
) -> None:
    """One panel per cost: quality vs that cost for every evaluated Shape, the front highlighted.
    Writes a PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(costs), figsize=(5 * len(costs), 4), squeeze=False)
    for axis, cost in zip(axes[0], costs, strict=True):
        axis.scatter([p[cost] for p in points], [p[quality] for p in points], s=12, c="0.7", label="evaluated")
        ordered = sorted(front, key=lambda p: p[cost])
        axis.plot(
            [p[cost] for p in ordered], [p[quality] for p in ordered], "o-", c="tab:blue", ms=5, label="Pareto front"
        )
        axis.set_xlabel(cost)
        axis.set_ylabel(quality)
        if quality == "ppl":
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
