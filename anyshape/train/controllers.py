"""What chooses the students of a step when it is learned beside the model, not sampled.

A controller owns modules that train with the model but outside it (their own optimizers,
averaged over processes by hand, checkpointed as companions) and turns them into the students
of each micro-batch, each with a penalty added to its loss:

    RouterControl    the budget router (LLaMaFlex): at each anchor budget a straight-through
                     sample of its choices; penalty: the budget loss
    PruningControl   hard-concrete masks and Lagrange multipliers (Sheared LLaMA): one sample of
                     the masks; penalty: the Lagrangian that drives the expected sizes to the
                     target (its multipliers ascend: their optimizer maximises)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from anyshape.model.config import LlamaFamilyConfig
from anyshape.prune.lagrangian import Lagrangian, lambda_optimizer, mask_optimizer
from anyshape.prune.masks import PruningMasks
from anyshape.prune.target import PruningTarget
from anyshape.router.budget import Budget
from anyshape.router.router import BudgetRouter, temperature
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


def micro_batch_generator(settings: TrainSettings, step: int, micro: int) -> torch.Generator:
    """The noise of (step, micro-batch): the same in every process and in a resumed run."""
    return torch.Generator().manual_seed((settings.seed * 1_000_003 + step) * 1_009 + micro)


class RouterControl:
    """The budget router's students (`--router`): one per anchor budget."""

    def __init__(self, settings: TrainSettings, space: SearchSpace, device: torch.device):
        self.settings = settings
        self.router = BudgetRouter(space, settings.anchors, settings.budget_basis)
        self.router.start_at_budgets()
        self.router.to(device)
        self.companions: Companions = {
            "router": (self.router, torch.optim.AdamW(self.router.parameters(), lr=settings.router_lr))
        }

    def students(self, step: int, micro: int) -> list[Student]:
        """One straight-through sample per anchor budget, penalised by the budget loss."""
        s = self.settings
        tau = temperature(step, s.steps, s.tau_start, s.tau_end)
        generator = micro_batch_generator(s, step, micro)
        students = []
        for anchor in s.anchors:
            logits = self.router.logits(anchor)
            penalty = s.budget_weight * self.router.budget_loss(anchor, logits, tau)
            students.append(Student(f"budget-{anchor:g}", self.router.sample(logits, tau, generator), penalty))
        return students

    @torch.no_grad()
    def metrics(self, step: int) -> dict[str, Any]:
        """The temperature of the step, and per anchor the expected parameters over its budget."""
        s = self.settings
        tau = temperature(step - 1, s.steps, s.tau_start, s.tau_end)
        expected = {
            f"budget-{a:g}": self.router.expected_fraction(self.router.logits(a), tau).item() / a for a in s.anchors
        }
        return {"router": {"tau": tau, "expected/budget": expected}}

    def trained_shape(self, largest: Shape) -> Shape:
        """The Shape whose held-out losses steer dynamic batch loading: the largest."""
        return largest

    def validation_shapes(self) -> dict[str, Shape]:
        """The Shape the router picks at each anchor budget."""
        basis = self.settings.budget_basis
        return {f"budget-{a:g}": self.router.route(Budget(a, basis)).shape for a in self.settings.anchors}


class PruningControl:
    """Targeted pruning's student (`prune_target`): the masked model, with the Lagrangian."""

    def __init__(self, settings: TrainSettings, config: LlamaFamilyConfig, device: torch.device):
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


Controller = RouterControl | PruningControl


def controller(
    settings: TrainSettings, space: SearchSpace, config: LlamaFamilyConfig, device: torch.device
) -> Controller | None:
    """The settings' controller, or None when the sampler alone chooses the students."""
    if settings.router:
        return RouterControl(settings, space, device)
    if settings.prune_target is not None:
        return PruningControl(settings, config, device)
    return None
