"""The next-token negative log-likelihood: the one loss that training, importance scores,
search objectives and held-out losses all build on (perplexity = exp of its mean)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from anyshape.model.llama import ElasticLlama
from anyshape.shape import Shape


def next_token_nll(logits: Tensor, input_ids: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy (nats, in float32) of logits (B, T, V) predicting input_ids (B, T) shifted by
    one: position t predicts token t + 1. `reduction` as F.cross_entropy's: mean, sum or none
    (then (B (T-1),))."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten(), reduction=reduction)


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
