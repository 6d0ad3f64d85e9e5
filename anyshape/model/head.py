"""A loss over the LM head computed a chunk of rows at a time, so that the logits of a whole
batch (rows x V, in float32 for the loss) are never held at once.

Each chunk's logits, loss and gradients (with respect to its hidden rows and the head weight)
are computed in the forward pass and the logits freed; the backward pass only scales the kept
gradients. The result and its gradients equal those of the loss of the whole logits, with no
second head matmul. (Liger-Kernel's fused linear cross-entropy does this for CUDA and one loss;
this works on every device and for any loss of a block of rows.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

HiddenLoss = Callable[[Tensor, Tensor], Tensor]  # (final hidden (B, T, H), head weight (V, H)) -> a scalar loss
RowsLoss = Callable[[Tensor, slice], Tensor]  # (logits (n, V) of rows[slice]) -> their summed loss, a scalar
CHUNK_VALUES = 2**25  # logits per chunk (128 MiB in float32): rows = CHUNK_VALUES // V


def chunk_rows(vocab_size: int) -> int:
    """Rows of logits in one chunk for a vocabulary of `vocab_size`."""
    return max(1, CHUNK_VALUES // vocab_size)


def head_loss(hidden: Tensor, weight: Tensor, rows_loss: RowsLoss, chunk: int) -> Tensor:
    """The sum over hidden's rows (N, H) of `rows_loss` of their logits hidden @ weight.T
    (weight (V, H)), `chunk` rows at a time; differentiable in `hidden` and `weight`."""
    if not (hidden.requires_grad or weight.requires_grad) or not torch.is_grad_enabled():
        with torch.no_grad():
            return sum(rows_loss(F.linear(hidden[rows], weight), rows) for rows in _chunks(len(hidden), chunk))
    return _HeadLoss.apply(hidden, weight, rows_loss, chunk)


def _chunks(total: int, chunk: int) -> list[slice]:
    return [slice(start, min(start + chunk, total)) for start in range(0, total, chunk)]


class _HeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, rows_loss: RowsLoss, chunk: int) -> Tensor:
        wants_hidden, wants_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        grad_weight = (
            torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32)) if wants_weight else None
        )
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for rows in _chunks(len(hidden), chunk):
            with torch.enable_grad():
                h = hidden[rows].detach().requires_grad_(wants_hidden)
                w = weight.detach().requires_grad_(wants_weight)
                loss = rows_loss(F.linear(h, w), rows)
                inputs = [t for t in (h, w) if t.requires_grad]
                grads = list(torch.autograd.grad(loss, inputs))
            if wants_hidden:
                grad_hidden[rows] = grads.pop(0)
            if wants_weight:
                grad_weight += grads.pop(0)
            total += loss.detach()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        scaled_hidden = grad_hidden * grad if grad_hidden is not None else None
        scaled_weight = (grad_weight * grad).to(ctx.weight_dtype) if grad_weight is not None else None
        return scaled_hidden, scaled_weight, None, None
