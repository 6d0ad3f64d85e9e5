"""Prunable units and the weights each one owns.

Units, with the tensor layout of their scores:
    neurons    (L, F)     MLP neurons of each layer
    heads      (L, G, q)  query heads, q per KV group
    kv_groups  (L, G)     key/value groups (a group owns its k/v heads and its query heads)
    channels   (H,)       embedding channels, shared by the whole residual stream
    layers     (L,)       decoder layers

A unit *owns* every weight that disappears when it is removed; the slicing table
(`model.slicing.AXES`) says which dimension of which parameter belongs to which unit kind,
so scores and permutations are derived from it rather than written out per parameter.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.slicing import axes_of

UNITS = ("neurons", "heads", "kv_groups", "channels", "layers")


def unit_sizes(config: LlamaFamilyConfig) -> dict[str, tuple[int, ...]]:
    """The score tensor shape of every unit kind."""
    L, G = config.num_hidden_layers, config.num_key_value_heads
    return {
        "neurons": (L, config.intermediate_size),
        "heads": (L, G, config.queries_per_group),
        "kv_groups": (L, G),
        "channels": (config.hidden_size,),
        "layers": (L,),
    }


def layer_index(name: str) -> int | None:
    """The layer of a parameter named `model.layers.<i>...`, else None."""
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def owned_totals(config: LlamaFamilyConfig, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Sums per-weight `values` (one tensor per parameter name, each shaped like the parameter)
    over the weights every unit owns. Returns neurons, heads, kv_groups and channels totals."""
    sizes = unit_sizes(config)
    G, q, d = config.num_key_value_heads, config.queries_per_group, config.head_dim
    totals = {kind: torch.zeros(sizes[kind]) for kind in ("neurons", "heads", "kv_groups", "channels")}
    for name, value in values.items():
        layer = layer_index(name)
        value = value.detach().float()
        for dim, axis in enumerate(axes_of(name)):
            if axis is None:
                continue
            other = [i for i in range(value.dim()) if i != dim]
            along = value.sum(dim=other) if other else value  # (size of `dim`,)
            if axis == "hidden":
                totals["channels"] += along
            elif axis == "ffn":
                totals["neurons"][layer] += along
            elif axis == "query":
                totals["heads"][layer] += along.view(G, q, d).sum(-1)
            else:  # kv
                totals["kv_groups"][layer] += along.view(G, d).sum(-1)
    totals["kv_groups"] += totals["heads"].sum(-1)  # a group owns its query heads
    return totals
