"""The hard-concrete distribution (Louizos et al. 2018, "Learning sparse neural networks through
L0 regularization"), as CoFi and Sheared LLaMA use it for structured masks.

Written here because no maintained library offers it as a mask module. With u ~ U(0, 1):

    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)      a binary concrete sample in (0, 1)
    z = min(1, max(0, s (r - l) + l))                          stretched to (l, r), clipped to [0, 1]
    P(z > 0) = sigmoid(log_alpha - beta log(-l / r))           the expected L0 norm per unit

beta = 2/3, l = -0.1, r = 1.1. The stretch puts probability mass on exactly 0 and exactly 1, and
the sample is differentiable in log_alpha (reparameterised).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

BETA = 2 / 3  # temperature
LIMIT_L, LIMIT_R = -0.1, 1.1  # stretch interval
EPSILON = 1e-6  # keeps u away from 0 and 1


class HardConcrete(nn.Module):
    """One hard-concrete gate per unit: log_alpha (*size) is the learned score (higher = keep).

    `init_keep`: the initial P(z > 0) of every unit, in (0, 1)."""

    def __init__(self, size: tuple[int, ...], init_keep: float = 0.9):
        super().__init__()
        shift = BETA * math.log(-LIMIT_L / LIMIT_R)
        self.log_alpha = nn.Parameter(torch.full(size, math.log(init_keep / (1 - init_keep)) + shift))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """(*size) a reparameterised sample z in [0, 1], differentiable in log_alpha."""
        u = torch.rand(self.log_alpha.shape, generator=generator, device=self.log_alpha.device)
        u = u.clamp(EPSILON, 1 - EPSILON)
        s = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / BETA)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)

    def keep_probability(self) -> Tensor:
        """(*size) P(z > 0): summed over units, the expected number kept (differentiable)."""
        return torch.sigmoid(self.log_alpha - BETA * math.log(-LIMIT_L / LIMIT_R))

    def deterministic(self) -> Tensor:
        """(*size) the noise-free mask for evaluation: min(1, max(0, sigmoid(log_alpha) (r - l) + l))."""
        return (torch.sigmoid(self.log_alpha) * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0, 1)
