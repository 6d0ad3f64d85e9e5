"""Search algorithms over a SearchSpace: random, parameter-bin grid, and NSGA-II (optuna).

Each evaluates the quality of up to `trials` distinct Shapes that meet the bounds (lower and
upper limits on named costs, e.g. params <= 60M). Costs are cheap and checked first (measured
ones, like latency, only once the cheap bounds pass); only feasible Shapes cost a quality
evaluation. Given the seed, every algorithm is deterministic.

    random  axis sizes drawn uniformly, infeasible draws rejected
    bins    K bins uniform in parameter count between the smallest and largest feasible
            Shape; bins are visited in turn, each filled by rejection sampling (at most
            `draws_per_bin` draws per visit), so the evaluated Shapes cover every size
    nsga2   optuna's NSGA-II over the axis sizes, minimising the objectives, with the bounds
            as constraints (feasible Shapes rank first)
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from anyshape.errors import DataError, ShapeError
from anyshape.files import atomic_write_text
from anyshape.model.config import LlamaFamilyConfig
from anyshape.search.pareto import non_dominated
from anyshape.search.space import AXES, SearchSpace
from anyshape.shape import Shape

ALGORITHMS = ("random", "bins", "nsga2")
Bounds = Mapping[str, tuple[float | None, float | None]]


@dataclass(frozen=True)
class Trial:
    shape: Shape
    costs: dict[str, float]
    quality: float

    def objectives(self, costs: Sequence[str]) -> tuple[float, ...]:
        return (*(self.costs[name] for name in costs), self.quality)

    def to_dict(self, quality_name: str) -> dict[str, Any]:
        return {"shape": self.shape.to_dict(), **self.costs, quality_name: self.quality}


@dataclass
class SearchResult:
    """Every evaluated feasible Shape, in evaluation order, and how the search ran."""

    algorithm: str
    seed: int
    costs: tuple[str, ...]  # the cost objectives
    quality: str  # the quality objective
    bounds: dict[str, list[float | None]]
    trials: list[Trial]
    draws: int = 0  # Shapes drawn, feasible or not
    settings: dict[str, Any] = field(default_factory=dict)

    def front(self) -> list[Trial]:
        """The Pareto front over (costs..., quality), ordered by the first cost."""
        points = [trial.objectives(self.costs) for trial in self.trials]
        front = [self.trials[i] for i in non_dominated(points)]
        return sorted(front, key=lambda trial: trial.objectives(self.costs))

    def best(self) -> Trial:
        """The feasible Shape of lowest quality loss (ties: the fewest parameters)."""
        if not self.trials:
            raise ShapeError("the search evaluated no Shape within the bounds")
        return min(self.trials, key=lambda trial: (trial.quality, trial.costs.get("params", 0.0)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "seed": self.seed,
            "objectives": [*self.costs, self.quality],
            "bounds": self.bounds,
            "draws": self.draws,
            "settings": self.settings,
            "evaluated": [trial.to_dict(self.quality) for trial in self.trials],
            "pareto_front": [trial.to_dict(self.quality) for trial in self.front()],
        }

    def save(self, path: str | Path) -> None:
        """Writes the JSON file atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path, config: LlamaFamilyConfig) -> SearchResult:
        """Reads a search file, validating every Shape against `config`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            *costs, quality = data["objectives"]
            trials = [
                Trial(
                    Shape.from_dict(row["shape"], config),
                    {name: float(row[name]) for name in row if name not in ("shape", quality)},
                    float(row[quality]),
                )
                for row in data["evaluated"]
            ]
            return cls(
                data["algorithm"], data["seed"], tuple(costs), quality, data["bounds"], trials, data["draws"],
                data.get("settings", {}),
            )  # fmt: skip
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as error:
            raise DataError(f"{path} is not a readable search result ({error}); run the search again") from None


def _excess(value: float, limit: float) -> float:
    """How far value exceeds limit, relative to the limit (absolute when the limit is 0)."""
    return (value - limit) / abs(limit) if limit else value - limit


class _Feasibility:
    """Costs of Shapes, computed lazily and memoised, and the bounds check."""

    def __init__(self, costs: Mapping[str, Callable[[Shape], float]], bounds: Bounds, cheap_first: Sequence[str]):
        self.functions, self.bounds = costs, bounds
        self.order = sorted(bounds, key=lambda name: (name not in cheap_first, name))
        self.cache: dict[tuple[Shape, str], float] = {}

    def cost(self, shape: Shape, name: str) -> float:
        if (shape, name) not in self.cache:
            self.cache[(shape, name)] = self.functions[name](shape)
        return self.cache[(shape, name)]

    def violations(self, shape: Shape) -> list[float]:
        """Relative violation of each bound (<= 0: met), checked cheap costs first; after the
        first violated bound, the remaining ones are not computed (reported as 0)."""
        result = []
        for name in self.order:
            low, high = self.bounds[name]
            value = self.cost(shape, name)
            violation = max(
                _excess(value, high) if high is not None else 0.0,
                _excess(-value, -low) if low is not None else 0.0,
            )
            result.append(violation)
            if violation > 0:
                result += [0.0] * (len(self.order) - len(result))
                break
        return result


def search(
    space: SearchSpace,
    quality: Callable[[Shape], float],
    costs: Mapping[str, Callable[[Shape], float]],
    objectives: Sequence[str] = ("params",),
    algorithm: str = "nsga2",
    trials: int = 50,
    seed: int = 0,
    bounds: Bounds | None = None,
    quality_name: str = "ppl",
    draws_per_bin: int = 200,
    population_size: int = 16,
    progress: bool = False,
) -> SearchResult:
    """Evaluates up to `trials` distinct feasible Shapes of `space` with `algorithm`.

    `costs` maps cost names to functions of a Shape; `objectives` are the costs minimised
    together with `quality`; `bounds` maps cost names to (low, high), either None for no limit.
    Draws stop after 50 x trials + 1000 tries, so an almost infeasible space ends.
    """
    bounds = dict(bounds or {})
    if algorithm not in ALGORITHMS:
        raise DataError(f"unknown search algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if trials < 1:
        raise DataError(f"trials={trials} must be at least 1")
    for name in [*objectives, *bounds]:
        if name not in costs:
            raise DataError(f"unknown cost {name!r}; available here: {', '.join(costs)}")
    feasibility = _Feasibility(costs, bounds, cheap_first=("params", "params_non_embedding", "flops"))
    rng = random.Random(seed)
    evaluated: dict[Shape, Trial] = {}
    draws = 0
    max_draws = 50 * trials + 1000
    bar = tqdm(total=trials, desc=f"search ({algorithm})", unit="shape", disable=not progress)

    def evaluate(shape: Shape) -> Trial | None:
        """The shape's trial if it is feasible (evaluating it once), else None."""
        nonlocal draws
        draws += 1
        if shape in evaluated:
            return evaluated[shape]
        if any(v > 0 for v in feasibility.violations(shape)):
            return None
        recorded = dict.fromkeys([*objectives, *bounds])
        trial = Trial(shape, {name: feasibility.cost(shape, name) for name in recorded}, quality(shape))
        evaluated[shape] = trial
        bar.update()
        bar.set_postfix({quality_name: f"{trial.quality:.4g}"})
        return trial

    def draw() -> Shape:
        return space.shape({axis: rng.choice(space.options[axis]) for axis in AXES})

    settings: dict[str, Any] = {}
    try:
        if algorithm == "random":
            while len(evaluated) < trials and draws < max_draws:
                evaluate(draw())
        elif algorithm == "bins":
            settings = _bins(space, feasibility, trials, draws_per_bin, evaluate, draw, evaluated)
        else:
            settings = _nsga2(space, feasibility, objectives, trials, seed, population_size, evaluate, evaluated,
                              lambda: draws < max_draws)  # fmt: skip
    finally:
        bar.close()
    return SearchResult(
        algorithm, seed, tuple(objectives), quality_name, {k: list(v) for k, v in bounds.items()},
        list(evaluated.values()), draws, settings,
    )  # fmt: skip


def search_budget(
    space: SearchSpace,
    quality: Callable[[Shape], float],
    costs: Mapping[str, Callable[[Shape], float]],
    cost: str,
    budget: float,
    band: float,
    algorithm: str = "nsga2",
    trials: int = 50,
    seed: int = 0,
    progress: bool = False,
) -> SearchResult:
    """`search` of the Shapes whose `cost` lies within [(1 - band) budget, budget], minimising
    `cost`, FLOPs and quality; when no Shape of `space` lies in that band, of every Shape up to
    `budget`. The band keeps the search on the Shapes that use the budget."""
    for low in ((1 - band) * budget, None):
        result = search(
            space, quality, costs, (cost, "flops"), algorithm, trials, seed, {cost: (low, budget)}, progress=progress
        )
        if result.trials:
            break
    return result


def _bins(space, feasibility, trials, draws_per_bin, evaluate, draw, evaluated) -> dict[str, Any]:
    param_cost = next(name for name in ("params", "params_non_embedding") if name in feasibility.functions)
    low, high = feasibility.bounds.get(param_cost, (None, None))
    smallest, largest = feasibility.cost(space.smallest(), param_cost), feasibility.cost(space.largest(), param_cost)
    low = smallest if low is None else max(low, smallest)
    high = largest if high is None else min(high, largest)
    if low > high:
        return {"bins": 0, "bin_cost": param_cost}
    edges = [low + (high - low) * i / trials for i in range(trials + 1)]
    open_bins = list(range(trials))
    while len(evaluated) < trials and open_bins:
        for b in list(open_bins):
            if len(evaluated) >= trials:
                break
            for _ in range(draws_per_bin):
                shape = draw()
                value = feasibility.cost(shape, param_cost)
                inside = edges[b] <= value < edges[b + 1] or (b == trials - 1 and value == edges[-1])
                if inside and shape not in evaluated and evaluate(shape) is not None:
                    break
            else:
                open_bins.remove(b)  # this visit found nothing new: the bin is (nearly) empty
    return {"bins": trials, "bin_cost": param_cost, "draws_per_bin": draws_per_bin}


def _nsga2(space, feasibility, objectives, trials, seed, population_size, evaluate, evaluated, may_draw):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
    study = optuna.create_study(directions=["minimize"] * (len(objectives) + 1), sampler=sampler)
    while len(evaluated) < trials and may_draw():
        asked = study.ask()
        shape = space.shape({axis: asked.suggest_categorical(axis, list(space.options[axis])) for axis in AXES})
        for name, violation in zip(feasibility.order, feasibility.violations(shape), strict=True):
            asked.set_constraint(name, violation)
        trial = evaluate(shape)
        if trial is None:  # infeasible: worst possible values; the constraints rank it last
            study.tell(asked, [math.inf] * (len(objectives) + 1))
        else:
            study.tell(asked, list(trial.objectives(objectives)))
    return {"population_size": population_size}
