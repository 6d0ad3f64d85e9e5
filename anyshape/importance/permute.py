"""Exact importance sorting: permute units so the most important come first.

Permuting the neurons of a layer, its KV groups, the query heads inside each group, or the
embedding channels (through every weight that touches them: norms and tied embeddings
included) is a re-parameterisation: the logits do not change. Afterwards every width of a
Shape keeps the best units, so all Shapes are nested sub-networks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from anyshape.importance.scores import Scores
from anyshape.importance.units import layer_index
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama
from anyshape.model.slicing import axes_of


@dataclass(frozen=True)
class Permutation:
    """New position -> old index, per unit kind.

    channels (H,); neurons (L, F); kv_groups (L, G); heads (L, G, q), where heads[l, g] orders
    the query heads of the parent's group g (the heads travel with their group).
    """

    channels: Tensor
    neurons: Tensor
    kv_groups: Tensor
    heads: Tensor

    @classmethod
    def from_scores(cls, scores: Scores) -> Permutation:
        """Descending importance; ties keep their original order."""

        def order(tensor: Tensor) -> Tensor:
            return torch.argsort(tensor, dim=-1, descending=True, stable=True)

        return cls(order(scores.channels), order(scores.neurons), order(scores.kv_groups), order(scores.heads))

    def row_index(self, axis: str, layer: int | None, config: LlamaFamilyConfig) -> Tensor:
        """Indices along one parameter dimension of elastic `axis` (see `model.slicing`)."""
        if axis == "hidden":
            return self.channels
        if axis == "ffn":
            return self.neurons[layer]
        d = torch.arange(config.head_dim)
        groups = self.kv_groups[layer]  # (G,)
        if axis == "kv":
            return (groups[:, None] * config.head_dim + d).flatten()
        heads = self.heads[layer][groups]  # (G, q): old head within old group, in new order
        old_heads = groups[:, None] * config.queries_per_group + heads  # (G, q) flat old head index
        return (old_heads[..., None] * config.head_dim + d).flatten()


@torch.no_grad()
def permute_(model: ElasticLlama, permutation: Permutation) -> ElasticLlama:
    """Permutes `model`'s parameters in place (tied embeddings stay tied); returns it."""
    for name, parameter in model.named_parameters():
        tensor = parameter.data
        for dim, axis in enumerate(axes_of(name)):
            if axis is not None:
                index = permutation.row_index(axis, layer_index(name), model.config)
                tensor = tensor.index_select(dim, index.to(tensor.device))
        parameter.data = tensor
    return model


def sort_(model: ElasticLlama, scores: Scores) -> Scores:
    """Sorts `model` in place by `scores` (checked against its config), most important first;
    returns the scores in the sorted model's order."""
    permutation = Permutation.from_scores(scores.check(model.config))
    permute_(model, permutation)
    heads = torch.stack([layer[groups] for layer, groups in zip(scores.heads, permutation.kv_groups, strict=True)])
    return Scores(
        neurons=scores.neurons.gather(-1, permutation.neurons),
        heads=heads.sort(dim=-1, descending=True, stable=True).values,
        kv_groups=scores.kv_groups.gather(-1, permutation.kv_groups),
        channels=scores.channels[permutation.channels],
        layers=scores.layers,
        info={**scores.info, "sorted": True},
    )
