"""Calibrated compensation: re-fit a Shape's output projections by ridge least squares.

Slicing a Shape out of its parent drops layers, channels, heads and neurons, and with them
what they added to the residual stream. Compensation (as in LLM-Pruner, FLAP, SlimGPT) re-fits
each kept layer's `o_proj` and then its `down_proj`, in closed form, so that the sliced layer
reproduces the parent on calibration activations. With X (n, K) the activations entering the
projection, Y (n, H') what the projection should output (its bias held fixed and subtracted)
and W0 (H', K) the plain slice:

    W^T = (X^T X + lam I)^-1 (X^T Y + lam W0^T),    lam = ridge * mean(diag(X^T X)),

a ridge towards the plain slice (ridge -> inf gives W0 back). The fit is sequential, as in
SparseGPT: X comes from the child with every earlier projection already compensated, so each
fit also corrects the errors that reach it. The result has exactly the plain slice's tensors.

The target of the attention or MLP branch of kept layer j (parent layer i) is what the branch
must add to the child's residual stream to match the parent's after the same branch of layer i,
on the kept channels [:H'], so it also stands in for the dropped layers before it.
It beat the parent branch's own output, as target, on every SmolLM2-135M Shape tried.

Notation: B batch, S tokens, H / H' parent / child hidden channels, K a projection's input
width (Q' d for o_proj, F' for down_proj).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from anyshape.errors import DataError
from anyshape.export.extract import extract_model
from anyshape.model.llama import DecoderLayer, ElasticLlama
from anyshape.shape import Shape

RIDGE = 1e-1  # best of 1e-3, 1e-2, 1e-1, 1 on SmolLM2-135M Shapes at 50% and 75% of non-embedding parameters


@dataclass(frozen=True)
class Branch:
    """One residual branch of a layer: `run` maps the residual stream (B, S, H') to what the
    branch adds to it, through `projection`, whose input the identity module `tap` sees."""

    run: Callable[[Tensor], Tensor]
    projection: nn.Linear
    tap: nn.Module


def branches(layer: DecoderLayer, rope: tuple[Tensor, Tensor], shape: Shape) -> tuple[Branch, Branch]:
    """The attention and the MLP branch of `layer` at `shape`, in the order the layer runs them."""
    attention, mlp = layer.self_attn, layer.mlp

    def attend(x: Tensor) -> Tensor:
        return attention(layer.input_layernorm(x, shape), rope, shape)

    def transform(x: Tensor) -> Tensor:
        return mlp(layer.post_attention_layernorm(x, shape), shape)

    return (
        Branch(attend, attention.o_proj, attention.head_outputs),
        Branch(transform, mlp.down_proj, mlp.neuron_outputs),
    )


@torch.no_grad()
def compensate(
    parent: ElasticLlama,
    shape: Shape,
    input_ids: Tensor,
    ridge: float = RIDGE,
    batch_size: int = 4,
    progress: bool = False,
) -> ElasticLlama:
    """The Shape's sub-network of `parent` (see `extract_model`) with every kept layer's o_proj
    and down_proj re-fitted on calibration input_ids (N, S); `parent` is not modified.

    `ridge` (> 0) is relative to the mean diagonal of X^T X.
    Memory: a few residual streams of all N x S tokens (parent's, child's, targets) and the
    inputs of one projection.
    """
    shape.validate(parent.config)
    if not 0 < ridge < math.inf:
        raise DataError(
            f"ridge={ridge} must be positive and finite; use e.g. {RIDGE} (larger stays closer to the plain slice)"
        )
    child = extract_model(parent, shape)
    device = parent.inv_freq.device
    batches = [ids.to(device) for ids in input_ids.split(batch_size)]
    parent_states = [F.embedding(ids, parent.model.embed_tokens.weight) for ids in batches]  # (B, S, H) each
    child_states = [F.embedding(ids, child.model.embed_tokens.weight) for ids in batches]  # (B, S, H') each
    parent_rope = parent.rope(input_ids.shape[1], parent_states[0].dtype)
    child_rope = child.rope(input_ids.shape[1], child_states[0].dtype)
    kept = {i: j for j, i in enumerate(shape.layers)}
    channels = shape.hidden_size
    for i in tqdm(range(shape.layers[-1] + 1), desc="compensate", unit="layer", disable=not progress):
        parent_branches = branches(parent.model.layers[i], parent_rope, parent.full_shape)
        child_branches = branches(child.model.layers[kept[i]], child_rope, child.full_shape) if i in kept else None
        for index, parent_branch in enumerate(parent_branches):
            parent_states = [x + parent_branch.run(x) for x in parent_states]  # (B, S, H) each
            if child_branches is None:  # a dropped layer: the next kept one makes up for it
                continue
            child_branch = child_branches[index]
            targets = [p[..., :channels] - c for p, c in zip(parent_states, child_states, strict=True)]  # (B, S, H')
            child_outputs = refit_projection(child_branch, child_states, targets, ridge)
            child_states = [x + y for x, y in zip(child_states, child_outputs, strict=True)]
    return child


def refit_projection(branch: Branch, inputs: list[Tensor], targets: list[Tensor], ridge: float) -> list[Tensor]:
    """Sets `branch.projection.weight` to the ridge least-squares fit (solved in float64) of the
    branch's outputs on inputs (B, S, H') to targets (B, S, H'), the bias held fixed; returns
    the branch's outputs (B, S, H') with the new weight."""
    projection = branch.projection
    width = projection.in_features
    gram = torch.zeros(width, width, dtype=torch.float64, device=projection.weight.device)  # X^T X (K, K)
    cross = torch.zeros(width, projection.out_features, dtype=torch.float64, device=gram.device)  # X^T Y (K, H')
    activations: list[Tensor] = []  # X of each batch, (B, S, K)
    handle = branch.tap.register_forward_hook(lambda module, args, output: activations.append(output))
    try:
        for x, y in zip(inputs, targets, strict=True):
            branch.run(x)
            features = activations[-1].flatten(0, 1).float()  # (B S, K)
            wanted = y.flatten(0, 1).float()  # (B S, H')
            if projection.bias is not None:
                wanted = wanted - projection.bias.float()
            gram += features.T @ features  # a batch's sum in float32 (fast), the total in float64
            cross += features.T @ wanted
    finally:
        handle.remove()
    lam = ridge * gram.diagonal().mean()
    plain = projection.weight.double()  # W0 (H', K)
    regularised = gram + lam * torch.eye(width, dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(regularised, cross + lam * plain.T)  # W^T (K, H')
    projection.weight.copy_(solution.T)
    return [F.linear(features, projection.weight, projection.bias) for features in activations]
