"""Targeted pruning in a training run: the controller whose student is the masked model."""

from __future__ import annotations

from typing import Any

import torch

from anyshape.prune.lagrangian import Lagrangian, lambda_optimizer, mask_optimizer
from anyshape.prune.masks import PruningMasks
from anyshape.prune.target import PruningTarget
from anyshape.search.space import SearchSpace
from anyshape.shape import Shape
from anyshape.train.checkpoint import Companions
from anyshape.train.controller import Student, micro_batch_generator
from anyshape.train.settings import TrainSettings


class PruningControl:
    """Targeted pruning's student (Sheared LLaMA, `prune_target`): one hard-concrete sample of
    the masks, penalised by the Lagrangian that drives the expected sizes to the target (its
    multipliers ascend: their optimizer maximises). The largest Shape only teaches."""

    largest_learns = False

    def __init__(self, settings: TrainSettings, space: SearchSpace, device: torch.device):
        config = space.config
        self.settings = settings
        self.target = PruningTarget.from_dict(dict(settings.prune_target), config)
        self.masks = PruningMasks(config).to(device)
        self.lagrangian = Lagrangian(config, self.target, settings.target_warmup_steps).to(device)
        self.companions: Companions = {
            "masks": (self.masks, mask_optimizer(self.masks, settings.mask_lr)),
            "lagrangian": (self.lagrangian, lambda_optimizer(self.lagrangian, settings.lambda_lr)),
        }

    def students(self, step: int, micro: int) -> list[Student]:
        """One hard-concrete sample of the masks, penalised by the Lagrangian."""
        shape = self.masks.sample(training=True, generator=micro_batch_generator(self.settings, step, micro))
        return [Student("pruned", shape, self.lagrangian(self.masks.expected_fractions(), step))]

    @torch.no_grad()
    def metrics(self, step: int) -> dict[str, Any]:
        """Expected sizes (layer means), the target sizes of the step, and the multipliers."""
        config = self.masks.config
        expected = {name: size.mean().item() for name, size in self.masks.expected_sizes().items()}
        targets = {name: fraction * getattr(config, name) for name, fraction in self.lagrangian.targets(step).items()}
        return {
            "prune": {
                "expected": expected,
                "target": targets,
                "lambda_1": self.lagrangian.lambda_1.tolist(),
                "lambda_2": self.lagrangian.lambda_2.tolist(),
            }
        }

    def validation_shapes(self) -> dict[str, Shape]:
        """The deterministic masks: the sub-network pruning has chosen so far."""
        return {"pruned": self.masks.sample(training=False)}

    def trained_shape(self, largest: Shape) -> Shape:
        """The Shape whose held-out losses steer dynamic batch loading: the pruned sub-network."""
        return self.masks.sample(training=False)
