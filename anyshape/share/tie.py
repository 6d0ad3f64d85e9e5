"""Applying a sharing plan to an ElasticLlama, in place.

A replaced projection's `weight` becomes the very nn.Parameter of its reference (one tensor,
read by both layers), its recovery module goes into its `adapter` slot, and only recovery
parameters train: everything else is frozen. The model stays an ordinary ElasticLlama, so the
forward pass, every Shape, training, `merged()` and export work unchanged.
"""

from __future__ import annotations

from torch import nn

from anyshape.errors import AnyshapeError
from anyshape.model.llama import ElasticLinear, ElasticLlama
from anyshape.share.plan import COMPONENTS, SharingPlan
from anyshape.share.recovery import fit_to_weight, make_recovery


def projection(model: ElasticLlama, layer: int, name: str) -> ElasticLinear:
    """Layer `layer`'s projection `name` (q_proj, ..., down_proj)."""
    block = model.model.layers[layer]
    return getattr(block.mlp if name in COMPONENTS["mlp"] else block.self_attn, name)


def share_weights(model: ElasticLlama, plan: SharingPlan, initialise: bool = True) -> list[nn.Parameter]:
    """Applies `plan` to `model` and returns the recovery parameters, the only trainable ones.
    With `initialise`, each recovery starts at its fit of the replaced layer's own weight
    (`fit_to_weight`); without, it keeps its module's initialisation (for loading)."""
    plan.validate(model.config.num_hidden_layers)
    for layer, reference in plan.pairs:
        for name in plan.projections:
            target, source = projection(model, layer, name), projection(model, reference, name)
            if plan.rank > min(target.weight.shape):
                raise AnyshapeError(
                    f"rank {plan.rank} exceeds {name}'s smaller dimension {min(target.weight.shape)}; "
                    f"choose --rank {min(target.weight.shape)} or less"
                )
            recovery = make_recovery(target, plan)
            if initialise and recovery is not None:
                fit_to_weight(recovery, source.weight, target.weight)
            target.weight, target.adapter = source.weight, recovery
    return freeze_all_but_recovery(model)


def tie(model: ElasticLlama, plan: SharingPlan) -> None:
    """Makes every replaced projection's weight its reference's Parameter again (after a
    `load_state_dict(assign=True)` gave the references new ones)."""
    for layer, reference in plan.pairs:
        for name in plan.projections:
            projection(model, layer, name).weight = projection(model, reference, name).weight


def freeze_all_but_recovery(model: ElasticLlama) -> list[nn.Parameter]:
    """Freezes `model` except its recovery parameters (those in adapter slots); returns them."""
    model.requires_grad_(False)
    recovery = [
        parameter
        for module in model.modules()
        if isinstance(module, ElasticLinear) and module.adapter is not None
        for parameter in module.adapter.parameters()
    ]
    for parameter in recovery:
        parameter.requires_grad_(True)
    return recovery
