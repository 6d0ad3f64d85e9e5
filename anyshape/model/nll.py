"""The next-token negative log-likelihood: the one loss that training, importance scores,
search objectives and held-out losses all build on (perplexity = exp of its mean)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from anyshape.model.head import HiddenLoss, chunk_rows, head_loss
from anyshape.model.llama import ElasticLlama
from anyshape.shape import Shape


def next_token_nll(logits: Tensor, input_ids: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy (nats, in float32 at least) of logits (B, T, V) predicting input_ids (B, T) shifted by
    one: position t predicts token t + 1. `reduction` as F.cross_entropy's: mean, sum or none
    (then (B (T-1),)). Computed a chunk of rows at a time: no float32 copy of the whole logits."""
    rows, T = chunk_rows(logits.shape[-1]), logits.shape[1]
    chunk = "none" if reduction == "none" else "sum"
    spans = [(start, min(start + rows, T - 1)) for start in range(0, T - 1, rows)] or [(0, 0)]
    losses = [
        F.cross_entropy(at_least_float32(logits[b, start:stop]), input_ids[b, start + 1 : stop + 1], reduction=chunk)
        for b in range(logits.shape[0])
        for start, stop in spans
    ]
    if reduction == "none":
        return torch.cat(losses)
    total = torch.stack(losses).sum()
    return total / (input_ids.shape[0] * (T - 1)) if reduction == "mean" else total


def at_least_float32(values: Tensor) -> Tensor:
    """`values` in float32, or in their own dtype if it is wider (float64)."""
    return values.to(torch.promote_types(values.dtype, torch.float32))


def next_token_loss(input_ids: Tensor) -> HiddenLoss:
    """The loss `model(input_ids, shape, loss=...)` returns: next_token_nll (mean) of the logits
    of its final hidden states, computed a chunk of rows at a time (`anyshape.model.head`)."""
    targets = input_ids[:, 1:].flatten()

    def rows_loss(logits: Tensor, rows: slice) -> Tensor:
        return F.cross_entropy(at_least_float32(logits), targets[rows], reduction="sum")

    def loss(hidden: Tensor, weight: Tensor) -> Tensor:
        return head_loss(hidden[:, :-1].flatten(0, 1), weight, rows_loss, chunk_rows(len(weight))) / len(targets)

    return loss


@torch.no_grad()
def mean_nll(model: ElasticLlama, input_ids: Tensor, shape: Shape | None = None, batch_size: int = 4) -> float:
    """Mean next-token NLL (nats) of `model` at `shape` over sequences (N, S), every position
    after the first of each sequence scored; exp of it is their perplexity."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        batch = input_ids[start : start + batch_size].to(device)
        total += next_token_nll(model(batch, shape), batch, reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count
