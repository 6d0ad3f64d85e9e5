"""The only code that turns (config, Shape) into weight slices.

After importance sorting every width is a prefix, so a sub-network's weights are views of the
parent's. Each parameter, named by its Hugging Face suffix, declares one elastic axis per
dimension (`AXES`); `slice_parameter` keeps the Shape's prefix along each of them. The elastic
forward pass (`model/llama.py`) and export (`export/extract.py`) both call it, so they cannot
disagree.

Axis kinds:
    hidden   embedding channels, prefix H'
    ffn      MLP neurons, prefix F'
    query    query heads laid out (G, q, head_dim): keep groups [:G'] and heads [:q'] in each
    kv       key/value heads laid out (G, head_dim): keep groups [:G']
    None     not elastic (vocabulary)
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyshape.model.config import LlamaFamilyConfig
from anyshape.shape import Shape

AXES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens.weight": (None, "hidden"),
    "lm_head.weight": (None, "hidden"),
    "norm.weight": ("hidden",),
    "input_layernorm.weight": ("hidden",),
    "post_attention_layernorm.weight": ("hidden",),
    "q_proj.weight": ("query", "hidden"),
    "q_proj.bias": ("query",),
    "k_proj.weight": ("kv", "hidden"),
    "k_proj.bias": ("kv",),
    "v_proj.weight": ("kv", "hidden"),
    "v_proj.bias": ("kv",),
    "o_proj.weight": ("hidden", "query"),
    "o_proj.bias": ("hidden",),
    "gate_proj.weight": ("ffn", "hidden"),
    "gate_proj.bias": ("ffn",),
    "up_proj.weight": ("ffn", "hidden"),
    "up_proj.bias": ("ffn",),
    "down_proj.weight": ("hidden", "ffn"),
    "down_proj.bias": ("hidden",),
}


def axes_of(name: str) -> tuple[str | None, ...]:
    """Elastic axes of a parameter from its (possibly prefixed) Hugging Face name."""
    key = ".".join(name.split(".")[-2:])
    if key not in AXES:
        raise KeyError(f"no slicing rule for parameter {name!r}")
    return AXES[key]


def slice_parameter(name: str, tensor: Tensor, config: LlamaFamilyConfig, shape: Shape) -> Tensor:
    """The Shape's part of one parameter: a view, or a copy only when query heads are dropped
    inside a group (a (G, q, d) prefix that is not one strided block). Under torch.compile always
    a contiguous copy: graphs compiled for any width (dynamic sizes) may not assume a view's strides."""
    sliced = slice_along(tensor, axes_of(name), config, shape)
    return sliced.contiguous() if torch.compiler.is_compiling() else sliced


def slice_along(tensor: Tensor, axes: tuple[str | None, ...], config: LlamaFamilyConfig, shape: Shape) -> Tensor:
    """The Shape's prefix of `tensor` along each dimension's axis kind (e.g. an adapter's
    (r, in) matrix sliced along its base weight's input axis: `(None, "hidden")`)."""
    for dim, axis in enumerate(axes):
        tensor = _take_prefix(tensor, dim, axis, config, shape)
    return tensor


def _take_prefix(tensor: Tensor, dim: int, axis: str | None, config: LlamaFamilyConfig, shape: Shape) -> Tensor:
    if axis is None:
        return tensor
    if axis == "hidden":
        return tensor.narrow(dim, 0, shape.hidden_size)
    if axis == "ffn":
        return tensor.narrow(dim, 0, shape.intermediate_size)
    if axis == "kv":
        return tensor.narrow(dim, 0, shape.num_key_value_heads * config.head_dim)
    # axis == "query": (G * q * d) -> (G, q, d) -> [:G', :q'] -> (G' * q' * d)
    if (shape.num_key_value_heads, shape.queries_per_group) == (
        config.num_key_value_heads,
        config.queries_per_group,
    ):
        return tensor
    sizes = list(tensor.shape)
    grouped = tensor.unflatten(dim, (config.num_key_value_heads, config.queries_per_group, config.head_dim))
    grouped = grouped.narrow(dim, 0, shape.num_key_value_heads).narrow(dim + 1, 0, shape.queries_per_group)
    sizes[dim] = shape.num_attention_heads * config.head_dim
    return grouped.reshape(sizes)
