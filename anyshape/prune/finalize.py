"""Finalisation: deterministic masks that hit the target exactly, then a standard HF folder.

The learned log_alpha of each gate is its unit's score. Per structure the top units are kept:
the target's L' layers, H' channels and, in every layer, the top G' KV groups, the top q' query
heads of each kept group and the top F' neurons, so every kept layer has the same widths and the
result is a uniform Shape. Sorting the model by these scores (`importance.permute.sort_`, an
exact re-parameterisation) puts the kept units first, so the Shape's prefixes are exactly them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyshape.export.hf import export_hf
from anyshape.importance.permute import sort_
from anyshape.importance.scores import Scores
from anyshape.model.llama import ElasticLlama
from anyshape.model.masks import MaskedShape, shape_features
from anyshape.prune.masks import PruningMasks
from anyshape.prune.target import PruningTarget
from anyshape.shape import Shape


def top_units(scores: Tensor, k: int) -> Tensor:
    """0/1 mask, shaped like scores, of the k highest along the last dim (ties: the lower index,
    as `sort_` orders them)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(scores)
    return keep.scatter(-1, order[..., :k], 1.0)


def final_masks(masks: PruningMasks, target: PruningTarget) -> MaskedShape:
    """The hard masks of the target's top units, as a MaskedShape of the (unsorted) model."""
    s = masks.scores()
    groups = top_units(s["kv_groups"], target.num_key_value_heads)  # (L, G)
    heads = groups.unsqueeze(-1) * top_units(s["heads"], target.queries_per_group)  # (L, G, q)
    return MaskedShape.of(
        masks.config,
        layer_mask=top_units(s["layers"], target.num_hidden_layers),
        hidden_mask=top_units(s["hidden"], target.hidden_size),
        head_mask=heads.flatten(1),
        neuron_mask=top_units(s["neurons"], target.intermediate_size),
        features=shape_features(final_shape(masks, target), masks.config),
    )


def final_scores(masks: PruningMasks) -> Scores:
    """The gates' log_alpha as importance Scores, for `sort_`."""
    s = masks.scores()
    return Scores(
        neurons=s["neurons"],
        heads=s["heads"],
        kv_groups=s["kv_groups"],
        channels=s["hidden"],
        layers=s["layers"],
        info={"metric": "hard-concrete log_alpha"},
    )


def final_shape(masks: PruningMasks, target: PruningTarget) -> Shape:
    """The target Shape of the sorted model: the top-scored layers, in model order, and the target widths."""
    layers = torch.argsort(masks.scores()["layers"], descending=True, stable=True)[: target.num_hidden_layers]
    return Shape(
        tuple(sorted(layers.tolist())),
        target.hidden_size,
        target.num_attention_heads,
        target.num_key_value_heads,
        target.intermediate_size,
    ).validate(masks.config)


def finalize(
    model: ElasticLlama, masks: PruningMasks, target: PruningTarget, out: str | Path, **export: Any
) -> tuple[Path, Shape]:
    """Sorts `model` in place by the mask scores (so `masks` no longer index its units) and exports
    the target Shape with `export_hf(model, shape, out, **export)`. Returns the folder and the Shape."""
    shape = final_shape(masks, target)
    sort_(model, final_scores(masks))
    return export_hf(model, shape, out, **export), shape
