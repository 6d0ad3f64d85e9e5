"""One structured-pruning training step: how the loop combines the masks, the model and the lambdas.

masked   = masks.sample(training=True)                       a fresh hard-concrete sample
loss     = LM loss (or KD loss against the teacher's logits) of model(input_ids, shape=masked)
           + lagrangian(masks.expected_fractions(), step)
backward once; `optimizer` (mask logits, and the model's parameters if it trains them) descends,
`lambda_optimizer` (maximize=True) ascends. Freeze (requires_grad=False) the model parameters
that `optimizer` does not hold, or their gradients accumulate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from anyshape.model.llama import ElasticLlama
from anyshape.prune.lagrangian import Lagrangian
from anyshape.prune.masks import PruningMasks
from anyshape.train.distill import distillation_loss, lm_loss


def prune_step(
    model: ElasticLlama,
    masks: PruningMasks,
    lagrangian: Lagrangian,
    input_ids: Tensor,
    step: int,
    optimizer: torch.optim.Optimizer,
    lambda_optimizer: torch.optim.Optimizer,
    teacher_logits: Tensor | None = None,
    kd: str = "forward-kl",
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One step on input_ids (B, T); teacher_logits (B, T, V) switch the task loss to `kd`
    distillation. Returns the task loss, the Lagrangian term and the mean expected sizes."""
    logits = model(input_ids, shape=masks.sample(training=True, generator=generator))
    task = lm_loss(logits, input_ids) if teacher_logits is None else distillation_loss(kd, logits, teacher_logits)
    expected = masks.expected_fractions()
    constraint = lagrangian(expected, step)
    optimizer.zero_grad(set_to_none=True)
    lambda_optimizer.zero_grad(set_to_none=True)
    (task + constraint).backward()
    optimizer.step()
    lambda_optimizer.step()
    sizes = {f"expected_{name}": float(size.detach().mean()) for name, size in masks.expected_sizes().items()}
    return {"task_loss": float(task.detach()), "lagrangian": float(constraint.detach()), **sizes}
