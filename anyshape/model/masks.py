"""A Shape as channel masks on the full model: what a learned router trains through.

A MaskedShape has the parent's full geometry (so every weight slice is the whole weight) and
multiplies the model's units by masks: 1 keeps a unit, 0 drops it. With hard 0/1 masks the
masked forward computes what the sliced forward of the corresponding Shape computes; the
masks may carry straight-through gradients, so a loss on the logits reaches the choices that
made them (LLaMaFlex):

    x = embedding * m_hidden
    per layer i:  x = x + m_layer[i] * m_hidden * attention(norm(x))     heads masked by m_heads
                  x = x + m_layer[i] * m_hidden * mlp(norm(x))           neurons masked by m_neurons
    norm(x) = x / rms over the kept channels * weight

The residual stream stays zero outside the kept channels, so the root mean square over the
kept ones is sum(x^2) / H'. ElasticLlama runs a MaskedShape through the same layers as a Shape,
each given its `LayerGates`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from anyshape.model.config import LlamaFamilyConfig
from anyshape.shape import Shape


@dataclass(frozen=True, eq=False)
class LayerGates:
    """What one decoder layer multiplies by to run a MaskedShape (all at the parent's widths).

    residual (H,): each branch's output before it joins the residual stream, m_layer[i] * m_hidden;
    hidden (H,): the kept hidden channels, over which the layer's norms average;
    heads (Q d,): the attention heads' outputs entering o_proj, each head's d channels alike;
    neurons (F,): the MLP neurons entering down_proj.
    """

    residual: Tensor
    hidden: Tensor
    heads: Tensor
    neurons: Tensor


@dataclass(frozen=True, eq=False)
class MaskedShape(Shape):
    """The full Shape of a parent, with masks that select a sub-network.

    layer_mask (L,), hidden_mask (H,), head_mask (Q,) in the (G, q) order of the query heads,
    neuron_mask (F,); features (5,): the selected sizes as `shape_features` gives them. The head
    and neuron masks may also be given per layer, (L, Q) and (L, F), as structured pruning learns
    them; with hard masks that keep equally many units in every layer, sorting each layer's
    kept units first (`anyshape.importance.permute`) makes it a Shape.
    """

    layer_mask: Tensor
    hidden_mask: Tensor
    head_mask: Tensor
    neuron_mask: Tensor
    features: Tensor

    @classmethod
    def of(cls, config: LlamaFamilyConfig, **masks: Tensor) -> MaskedShape:
        full = Shape.full(config)
        return cls(full.layers, full.hidden_size, full.num_attention_heads, full.num_key_value_heads,
                   full.intermediate_size, **masks)  # fmt: skip

    def layer_gates(self, config: LlamaFamilyConfig) -> list[LayerGates]:
        """The gates of each of the parent's L layers, in order."""
        layers = config.num_hidden_layers
        heads = self.head_mask.expand(layers, -1).repeat_interleave(config.head_dim, dim=-1)  # (L, Q d)
        neurons = self.neuron_mask.expand(layers, -1)  # (L, F)
        return [
            LayerGates(keep * self.hidden_mask, self.hidden_mask, heads[i], neurons[i])
            for i, keep in enumerate(self.layer_mask)
        ]


def shape_features(shape: Shape, config: LlamaFamilyConfig) -> Tensor:
    """(5,) the Shape's size on each elastic axis as a fraction of the parent's: depth, hidden,
    KV groups, query heads per group, MLP neurons (the input of Shape-conditioned modules)."""
    if isinstance(shape, MaskedShape):
        return shape.features
    return torch.tensor(
        [
            len(shape.layers) / config.num_hidden_layers,
            shape.hidden_size / config.hidden_size,
            shape.num_key_value_heads / config.num_key_value_heads,
            shape.queries_per_group / config.queries_per_group,
            shape.intermediate_size / config.intermediate_size,
        ]
    )
