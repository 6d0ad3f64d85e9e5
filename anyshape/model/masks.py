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
kept ones is sum(x^2) / H'.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from anyshape.model.config import LlamaFamilyConfig
from anyshape.shape import Shape

if TYPE_CHECKING:
    from anyshape.model.llama import ElasticLlama, RMSNorm


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


def masked_hidden_states(model: ElasticLlama, input_ids: Tensor, shape: MaskedShape) -> Tensor:
    """input_ids (B, T) -> final-normed hidden states (B, T, H), zero outside the kept channels."""
    hidden = shape.hidden_mask
    x = model.model.embed_tokens(input_ids) * hidden  # (B, T, H)
    rope = model.rope(input_ids.shape[1], x.dtype)
    with _masked_taps(model, shape):
        for layer, keep in zip(model.model.layers, shape.layer_mask, strict=True):
            x = x + keep * hidden * layer.self_attn(masked_rms_norm(layer.input_layernorm, x, hidden), rope, shape)
            x = x + keep * hidden * layer.mlp(masked_rms_norm(layer.post_attention_layernorm, x, hidden), shape)
    return masked_rms_norm(model.model.norm, x, hidden)


def masked_rms_norm(norm: RMSNorm, x: Tensor, hidden: Tensor) -> Tensor:
    """RMSNorm of x (B, T, H), zero outside the kept channels, over the kept channels only.

    The output is zero outside them as x is, so it is not masked again: a second mask factor
    would leave a dropped channel's gradient zero, m * m having no slope at m = 0. The count
    H' is a constant of the backward pass: its slope alone, without the slope of sum(x^2),
    which is zero at a dropped channel, would say that every channel added shrinks the RMS."""
    mean_square = x.pow(2).sum(-1, keepdim=True) / hidden.detach().sum()
    return x * torch.rsqrt(mean_square + norm.config.rms_norm_eps) * norm.weight


@contextlib.contextmanager
def _masked_taps(model: ElasticLlama, shape: MaskedShape) -> Iterator[None]:
    """Masks the attention heads entering o_proj and the MLP neurons entering down_proj."""
    layers = model.config.num_hidden_layers
    heads = shape.head_mask.expand(layers, -1).repeat_interleave(model.config.head_dim, dim=-1)  # (L, Q d)
    neurons = shape.neuron_mask.expand(layers, -1)  # (L, F)
    taps: list[tuple[nn.Module, Tensor]] = []
    for i, layer in enumerate(model.model.layers):
        taps += [(layer.self_attn.head_outputs, heads[i]), (layer.mlp.neuron_outputs, neurons[i])]
    handles = [tap.register_forward_hook(lambda _, __, y, m=mask: y * m) for tap, mask in taps]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
