"""The budget router in a training run: its controller (`anyshape train --router`) and the
router read back from a finished run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from anyshape.checkpoints import load_config
from anyshape.errors import CheckpointError
from anyshape.router.router import BudgetRouter, temperature
from anyshape.search.budget import Budget
from anyshape.search.space import SearchSpace
from anyshape.shape import Shape
from anyshape.train.checkpoint import Companions, load_companion
from anyshape.train.controller import Student, micro_batch_generator
from anyshape.train.loop import training_space
from anyshape.train.settings import TrainSettings, read_settings


class RouterControl:
    """The budget router's students (LLaMaFlex): one straight-through sample per anchor budget,
    penalised by the budget loss."""

    largest_learns = True

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


def load_router(run: Path) -> BudgetRouter:
    """The budget router a run trained (`anyshape train --router`), settled between its
    anchors for routing (`BudgetRouter.settle_between_anchors`)."""
    settings = read_settings(run)
    if not settings.router:
        raise CheckpointError(f"{run} was trained without a router; train one with --router --anchors ...")
    space = training_space(settings, load_config(settings.model))
    router = BudgetRouter(space, settings.anchors, settings.budget_basis)
    load_companion(run, "router", router).settle_between_anchors()
    return router.eval()
