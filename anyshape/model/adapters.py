"""Adapters on the frozen base: LoRA and SMOL (a Shape-aware mixture of LoRAs, AmoebaLLM).

Each adapter hangs on one `ElasticLinear` projection (its `adapter` slot) and adds a low-rank
update computed on the same slices as the base weight: A (r, in) is cut along the base's input
axis, B (out, r) along its output axis, so for every Shape

    slice(W + s B A) = slice(W) + s slice(B) slice(A)          s = alpha / r

and merging into the base weight is exact. SMOL keeps E such (A_e, B_e) pairs per projection and
a gate that maps the active Shape's widths to a weight per expert (softmax over the top k, the
rest zero), so different Shapes use different experts and conflict less.

peft's LoRA layers run their base layer on full-width inputs; the sliced forward here needs A and
B cut with the base weight, so the adapters are written here (about 100 lines).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anyshape.errors import AnyshapeError
from anyshape.model.llama import ElasticLinear, ElasticLlama
from anyshape.model.masks import shape_features
from anyshape.model.slicing import axes_of, slice_along
from anyshape.shape import Shape

ADAPTERS = ("full", "lora", "smol")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRA(nn.Module):
    """E low-rank updates of one projection and how they are mixed for a Shape.

    lora_A (E, r, in), lora_B (E, out, r), B zero at the start (the update starts at 0). With
    E = 1 this is LoRA; with E > 1 it is SMOL: `gate` maps `shape_features` to E logits, and the
    Shape's mixture is the softmax over its `top_k` largest logits.
    """

    def __init__(
        self,
        base: ElasticLinear,
        rank: int,
        alpha: float,
        experts: int = 1,
        top_k: int = 1,
        device: torch.device | None = None,
    ):
        super().__init__()
        if rank < 1 or experts < 1 or not 1 <= top_k <= experts:
            raise AnyshapeError(
                f"need rank >= 1, experts >= 1 and 1 <= top_k <= experts; got rank={rank}, experts={experts}, "
                f"top_k={top_k}"
            )
        self.config = base.config
        self.out_axis, self.in_axis = axes_of(f"{base.name}.weight")
        self.scale, self.top_k = alpha / rank, top_k
        like = {"device": device or base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(experts, rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(experts, base.out_features, rank, **like))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear and peft initialise A
        self.gate = nn.Linear(5, experts, **like) if experts > 1 else None

    def chosen_experts(self, shape: Shape) -> tuple[Tensor, Tensor]:
        """SMOL: (k,) the indices of `shape`'s top-k experts by gate logit, and (k,) their
        weights, the softmax over those logits."""
        top = self.gate(shape_features(shape, self.config).to(self.lora_A)).topk(self.top_k)
        return top.indices, top.values.softmax(0)

    def mixture(self, shape: Shape) -> Tensor:
        """(E,) the weight of each expert for `shape`: 1 for plain LoRA."""
        if self.gate is None:
            return self.lora_A.new_ones(1)
        indices, weights = self.chosen_experts(shape)
        return self.lora_A.new_zeros(len(self.lora_A)).scatter(0, indices, weights)

    def forward(self, x: Tensor, shape: Shape) -> Tensor:
        """x (B, T, in') -> the update (B, T, out'): s sum_e g_e B_e' A_e' x."""
        a = slice_along(self.lora_A, (None, None, self.in_axis), self.config, shape)  # (E, r, in')
        b = slice_along(self.lora_B, (None, self.out_axis, None), self.config, shape)  # (E, out', r)
        if self.gate is None:  # LoRA: one expert, nothing to choose
            return self.scale * F.linear(F.linear(x, a[0]), b[0])
        chosen, weights = self.chosen_experts(shape)  # on the device: nothing is read to the host
        middle = F.linear(x, a[chosen].flatten(0, 1))  # (B, T, k r): each chosen expert's A_e x
        middle = middle * weights.repeat_interleave(a.shape[1])  # times its weight g_e
        return self.scale * F.linear(middle, b[chosen].permute(1, 0, 2).flatten(1))  # sum over e of B_e (.)

    def delta_weight(self, shape: Shape) -> Tensor:
        """(out, in) the full-width update s sum_e g_e B_e A_e for `shape`'s mixture; its Shape
        slice is the sliced update, so adding it to the base weight merges exactly."""
        return self.scale * torch.einsum("e,eor,eri->oi", self.mixture(shape), self.lora_B, self.lora_A)


def projections(model: ElasticLlama) -> Iterator[tuple[str, ElasticLinear]]:
    """(qualified name, projection) of every q/k/v/o/gate/up/down projection."""
    for name, module in model.named_modules():
        if isinstance(module, ElasticLinear):
            yield name, module


def add_adapters(
    model: ElasticLlama,
    kind: str,
    rank: int = 16,
    alpha: float | None = None,
    experts: int = 4,
    top_k: int = 1,
    targets: tuple[str, ...] = PROJECTIONS,
    device: torch.device | None = None,
) -> list[nn.Parameter]:
    """Prepares `model` for training with `kind` (full, lora or smol) and returns the trainable
    parameters. lora and smol freeze the base and add a LoRA (one expert) or SMOL (`experts`)
    adapter on each `targets` projection, on `device` (default: the projection's); alpha
    defaults to 2 x rank."""
    if kind not in ADAPTERS:
        raise AnyshapeError(f"unknown adapter {kind!r}; choose one of {', '.join(ADAPTERS)}")
    unknown = sorted(set(targets) - set(PROJECTIONS))
    if unknown:
        raise AnyshapeError(f"unknown adapter targets {unknown}; choose among {', '.join(PROJECTIONS)}")
    if kind == "full":
        return [p for p in model.parameters() if p.requires_grad]
    if any(projection.adapter is not None for _, projection in projections(model)):
        raise AnyshapeError(
            f"the model already has adapters (a compact shared model's recovery), which --adapter {kind} would "
            "replace; train it with --adapter full (the recovery, or with --all-weights every weight)"
        )
    model.requires_grad_(False)
    alpha = 2.0 * rank if alpha is None else alpha
    for _, projection in projections(model):
        if projection.name in targets:
            n = experts if kind == "smol" else 1
            projection.adapter = LoRA(projection, rank, alpha, n, min(top_k, n), device)
    return [p for p in model.parameters() if p.requires_grad]


def has_adapters(model: ElasticLlama) -> bool:
    """Whether any projection has an adapter or a modulation (what `merged` folds)."""
    return any(p.adapter is not None or p.modulation is not None for _, p in projections(model))


@torch.no_grad()
def merged(model: ElasticLlama, shape: Shape) -> ElasticLlama:
    """A copy of `model` with every adapter and modulation folded into its base weights for
    `shape` (SMOL's mixture and the modulation depend on the Shape), and neither left: a plain
    model whose `shape` slice computes what the adapted model computes at `shape`.

    y = s * (W x + b + dW x)  folds into  W' = s[:, None] * (W + dW),  b' = s * b."""
    plain = copy.deepcopy(model)
    for _, projection in projections(plain):
        weight, bias = projection.weight, projection.bias  # new tensors: a weight may be shared by two layers
        if projection.adapter is not None:
            weight = weight + projection.adapter.delta_weight(shape)
        if projection.modulation is not None:
            scale = projection.modulation.scale(shape)  # (out,)
            weight = scale[:, None] * weight
            bias = None if bias is None else scale * bias
        projection.weight = nn.Parameter(weight, requires_grad=False)
        projection.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        projection.adapter = projection.modulation = None
    return plain
