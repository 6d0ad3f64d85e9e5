"""The Lagrangian that drives the masks' expected sizes to the target (Sheared LLaMA, CoFi).

Per structure s, with E_s the expected size and T_s the target, both as fractions of the parent's
size so that structures are comparable (per-layer sizes: one gap per layer, averaged):

    lagrangian = sum_s mean_layers( lambda1_s (E_s - T_s) + lambda2_s (E_s - T_s)^2 )

The masks (and the model) minimise it together with the language-model loss; the lambdas maximise
it by gradient ascent with their own optimizer, so lambda1_s grows while E_s > T_s (then pushing
E_s down) and shrinks while E_s < T_s, and lambda2_s grows with any remaining gap. During
`warmup_steps` the target moves linearly from the parent's size to the final one, as Sheared
LLaMA does, so the masks are not asked to jump at once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anyshape.model.config import LlamaFamilyConfig
from anyshape.prune.masks import PruningMasks
from anyshape.prune.target import FIELDS, PruningTarget

MASK_LR = 0.1  # AdamW learning rate of the mask logits (log_alpha)
LAMBDA_LR = 0.1  # AdamW learning rate of the lambdas (ascent)


class Lagrangian(nn.Module):
    """lambda_1, lambda_2 (5,): one pair per target field (FIELDS order), starting at zero."""

    def __init__(self, parent: LlamaFamilyConfig, target: PruningTarget, warmup_steps: int = 0):
        super().__init__()
        self.final = target.fractions(parent)
        self.warmup_steps = warmup_steps
        self.lambda_1 = nn.Parameter(torch.zeros(len(FIELDS)))
        self.lambda_2 = nn.Parameter(torch.zeros(len(FIELDS)))

    def targets(self, step: int) -> dict[str, float]:
        """field -> the target fraction at `step`: 1 (the parent) at step 0, linear to the final
        fraction at `warmup_steps`, constant after."""
        progress = min(1.0, step / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return {name: 1 + progress * (final - 1) for name, final in self.final.items()}

    def gaps(self, expected: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """field -> E - T, fractions, () or (L,), from `PruningMasks.expected_fractions()`."""
        targets = self.targets(step)
        return {name: expected[name] - targets[name] for name in FIELDS}

    def forward(self, expected: dict[str, Tensor], step: int) -> Tensor:
        """() the Lagrangian term of the loss at `step`."""
        gaps = self.gaps(expected, step)
        terms = [
            (self.lambda_1[i] * gaps[name] + self.lambda_2[i] * gaps[name].pow(2)).mean()
            for i, name in enumerate(FIELDS)
        ]
        return torch.stack(terms).sum()


def mask_optimizer(masks: PruningMasks, lr: float = MASK_LR) -> torch.optim.Optimizer:
    """Minimises the loss over the mask logits (no weight decay: it would pull logits to zero)."""
    return torch.optim.AdamW(masks.parameters(), lr=lr, weight_decay=0.0)


def lambda_optimizer(lagrangian: Lagrangian, lr: float = LAMBDA_LR) -> torch.optim.Optimizer:
    """Maximises the loss over the lambdas (gradient ascent)."""
    return torch.optim.AdamW(lagrangian.parameters(), lr=lr, weight_decay=0.0, maximize=True)
