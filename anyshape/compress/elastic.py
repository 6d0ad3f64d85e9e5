"""OUT/elastic/ of a compress family: the trained elastic model every member is cut from, and
any other size cut from it later.

Its anyshape.json keeps, under "elastic", the search space the family was searched in. A Shape
for a new budget B is found on the trained weights as compress found the members': the Shape of
lowest perplexity on calibration windows among those within [(1 - band) B, B] parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from anyshape.errors import ShapeError
from anyshape.export.provenance import read_provenance
from anyshape.importance.scores import scores_beside
from anyshape.model.llama import ElasticLlama
from anyshape.search.algorithms import Trial, search_budget
from anyshape.search.budget import Budget
from anyshape.search.objectives import Quality, cost_functions
from anyshape.search.space import SearchSpace

ELASTIC = "elastic"  # OUT/elastic/, and the entry of its anyshape.json


@dataclass(frozen=True)
class ElasticRecord:
    """How a family's elastic model was trained and searched (its anyshape.json "elastic" entry)."""

    train_tokens: int
    fractions: tuple[float, ...]  # the search space's grid, per axis
    align: int
    budget_basis: str  # "total" or "non-embedding"
    band: float  # members lie within [(1 - band) B, B] parameters
    algorithm: str
    trials: int  # Shapes the search evaluates per budget

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, folder: str | Path) -> ElasticRecord | None:
        """The record of a family's elastic/ folder; None for any other model."""
        path = Path(str(folder)).expanduser()
        record = read_provenance(path) if path.is_dir() else None
        entry = record.get(ELASTIC) if record else None
        if not isinstance(entry, dict):
            return None
        return cls(**{**entry, "fractions": tuple(entry["fractions"])})


def search_elastic(
    model: ElasticLlama, folder: Path, record: ElasticRecord, budget: Budget, windows: Tensor, seed: int = 0
) -> Trial:
    """The best Shape of `model` (loaded from `folder`) for `budget`: `record.trials` Shapes of
    the family's search space (the layers ranked by the importance scores beside it), the
    lowest perplexity on `windows` (N, S) wins."""
    config = model.config
    scores = scores_beside(folder, config)
    ranking = scores.layers.argsort(descending=True, stable=True).tolist() if scores is not None else None
    space = SearchSpace.from_fractions(config, record.fractions, ranking, record.align)
    cost = "params" if budget.basis == "total" else "params_non_embedding"
    result = search_budget(
        space, Quality(model, windows), cost_functions(model), cost, budget.parameters(config), record.band,
        record.algorithm, record.trials, seed, progress=True,
    )  # fmt: skip
    if not result.trials:
        smallest = space.smallest().num_parameters(config, embeddings=budget.basis == "total")
        raise ShapeError(
            f"no Shape of the family's search space fits a budget of {budget.fraction:g} ({budget.basis} "
            f"parameters); the smallest has {smallest:,}"
        )
    return min(result.trials, key=lambda trial: trial.quality)
