"""Recovery parameters of a replaced projection, in its `ElasticLinear.adapter` slot.

A replaced projection computes with its reference layer's weight W_ref (the same tensor, not a
copy) and adds its own recovery:

    lowrank   W = W_ref + B A                 B (out, r), A (r, in): r (in + out) parameters
    scaled    W = s * W_ref + B A             s (out,) per output channel, rank r - 1, so
                                              out + (r - 1)(in + out) <= r (in + out)

Both follow the Shape like the base weight (s and B along the output axis, A along the input
axis), and `delta_weight(shape)` is the full (out, in) update that `merged()` folds into W_ref,
so a merged export is exact. `fit_to_weight` starts them at their best fit of the replaced
layer's own weight in Frobenius norm (least-squares scales, truncated SVD), which the warm-up
then refines on the layer's outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anyshape.model.adapters import LoRA
from anyshape.model.llama import ElasticLinear
from anyshape.model.slicing import axes_of, slice_along, slice_parameter
from anyshape.shape import Shape
from anyshape.share.plan import SharingPlan


def low_rank(base: ElasticLinear, rank: int) -> LoRA:
    """B A with B zero, unscaled (alpha = rank): W = W_ref + B A."""
    return LoRA(base, rank, alpha=float(rank))


class ScaledLowRank(nn.Module):
    """(s - 1) * W_ref x + B A x: with the base's W_ref x, the projection computes (s * W_ref + B A) x.

    It reads its projection's weight (W_ref, shared with the reference layer) at every call but
    does not own it: `base` is held in a tuple, so the weight gets no second parameter name.
    """

    def __init__(self, base: ElasticLinear, rank: int):
        super().__init__()
        self.config, self.base = base.config, (base,)
        self.out_axis = axes_of(f"{base.name}.weight")[0]
        self.scale = nn.Parameter(torch.ones(base.out_features, device=base.weight.device, dtype=base.weight.dtype))
        self.low_rank = low_rank(base, rank) if rank else None

    def forward(self, x: Tensor, shape: Shape) -> Tensor:
        """x (B, T, in') -> the update (B, T, out')."""
        base = self.base[0]
        weight = slice_parameter(f"{base.name}.weight", base.weight, self.config, shape)  # (out', in')
        scale = slice_along(self.scale, (self.out_axis,), self.config, shape)  # (out',)
        update = (scale - 1) * F.linear(x, weight)
        return update if self.low_rank is None else update + self.low_rank(x, shape)

    def delta_weight(self, shape: Shape) -> Tensor:
        """(out, in): (s - 1) W_ref + B A."""
        delta = (self.scale - 1)[:, None] * self.base[0].weight
        return delta if self.low_rank is None else delta + self.low_rank.delta_weight(shape)


def make_recovery(base: ElasticLinear, plan: SharingPlan) -> nn.Module | None:
    """The plan's recovery module for one replaced projection (None with rank 0)."""
    if plan.rank == 0:
        return None
    return low_rank(base, plan.rank) if plan.recovery == "lowrank" else ScaledLowRank(base, plan.rank - 1)


@torch.no_grad()
def fit_to_weight(recovery: nn.Module, reference: Tensor, target: Tensor) -> None:
    """Sets `recovery` so that W_ref + its update best approximates `target` (out, in):
    per-row least-squares scales s = <target_o, W_ref_o> / |W_ref_o|^2 (scaled), then the
    truncated SVD of what is left (B = U sqrt(S), A = sqrt(S) V^T)."""
    residual = (target - reference).float()
    factors = recovery
    if isinstance(recovery, ScaledLowRank):
        scale = (target * reference).float().sum(1) / reference.float().pow(2).sum(1).clamp_min(1e-12)
        recovery.scale.copy_(scale)
        residual = target.float() - scale[:, None] * reference.float()
        factors = recovery.low_rank
    if factors is None:
        return
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    rank = factors.lora_A.shape[1]
    root = S[:rank].sqrt()
    factors.lora_B[0] = (U[:, :rank] * root) / factors.scale
    factors.lora_A[0] = root[:, None] * Vh[:rank]


@torch.no_grad()
def zero_update(recovery: nn.Module) -> None:
    """Makes `recovery`'s update zero (direct sharing): s = 1, B = 0; A stays, as in LoRA's start."""
    factors = recovery
    if isinstance(recovery, ScaledLowRank):
        recovery.scale.fill_(1.0)
        factors = recovery.low_rank
    if factors is not None:
        factors.lora_B.zero_()
