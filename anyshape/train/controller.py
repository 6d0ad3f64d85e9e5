"""What chooses a step's students when they are learned beside the model, not sampled.

The training loop takes a controller factory as an argument and knows nothing of what it
learns: the budget router (`anyshape.router.control`) and targeted pruning's masks
(`anyshape.prune.control`) each implement `Controller`. A controller owns modules that train
with the model but outside it (its `companions`: their own optimizers, averaged over processes
by the loop, checkpointed beside the weights) and turns them into the students of each
micro-batch, each with a penalty added to its loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from anyshape.search.space import SearchSpace
from anyshape.shape import Shape
from anyshape.train.checkpoint import Companions
from anyshape.train.settings import TrainSettings


@dataclass
class Student:
    """A Shape that learns from the largest in one micro-batch; `penalty` (a scalar) is added
    to its loss, without loss balancing."""

    slot: str
    shape: Shape
    penalty: Tensor | float = 0.0


class Controller(Protocol):
    """Learned students: `students(step, micro)` for each micro-batch, `metrics(step)` for the
    log, the Shapes every evaluation reports, and the Shape dynamic batch loading steers by."""

    companions: Companions
    largest_learns: bool  # False: the largest Shape only teaches (pruning trains the masked model)

    def students(self, step: int, micro: int) -> list[Student]: ...

    def metrics(self, step: int) -> dict[str, Any]: ...

    def validation_shapes(self) -> dict[str, Shape]: ...

    def trained_shape(self, largest: Shape) -> Shape: ...


ControllerFactory = Callable[[TrainSettings, SearchSpace, torch.device], Controller]


def micro_batch_generator(settings: TrainSettings, step: int, micro: int) -> torch.Generator:
    """The noise of (step, micro-batch): the same in every process and in a resumed run."""
    return torch.Generator().manual_seed((settings.seed * 1_000_003 + step) * 1_009 + micro)
