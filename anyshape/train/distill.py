"""In-place distillation losses and loss-magnitude balancing.

The largest Shape's logits (detached: a teacher computed once per batch) teach every smaller
Shape. Every loss is a mean over tokens of a per-token divergence between the student's logits s
and the teacher's t, each (B, T, V), with p = softmax(t) and q = softmax(s):

    forward-kl   KL(p || q) = sum_v p (log p - log q)      covers the teacher's mass
    reverse-kl   KL(q || p)                                 seeks the teacher's modes
    js           (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2
    cosine       1 - cos(s, t) over the vocabulary           (best in 2410.06479)
    l2           mean over the vocabulary of (s - t)^2

The largest Shape (and every Shape with `--kd none`) learns the next token (`model.nll`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from anyshape.errors import AnyshapeError
from anyshape.model.head import HiddenLoss, chunk_rows, head_loss

KD_LOSSES = ("forward-kl", "reverse-kl", "js", "cosine", "l2")


def distillation_loss(kind: str, student: Tensor, teacher: Tensor) -> Tensor:
    """Mean over the B x T tokens of the `kind` divergence of student logits from teacher logits,
    each (B, T, V); computed in float32 at least. Zero when the two are equal."""
    check_kind(kind)
    dtype = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(dtype).flatten(0, -2), teacher.detach().to(dtype).flatten(0, -2)  # (B T, V)
    if kind == "forward-kl":
        return _kl(t.log_softmax(-1), s.log_softmax(-1))
    if kind == "reverse-kl":
        return _kl(s.log_softmax(-1), t.log_softmax(-1))
    if kind == "js":
        log_p, log_q = t.log_softmax(-1), s.log_softmax(-1)
        log_m = torch.logsumexp(torch.stack((log_p, log_q)), dim=0) - math.log(2)
        return (_kl(log_p, log_m) + _kl(log_q, log_m)) / 2
    if kind == "cosine":
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return (s - t).pow(2).mean()  # l2


def distillation_head_loss(kind: str, teacher: Tensor) -> HiddenLoss:
    """The loss `model(ids, shape, loss=...)` returns: distillation_loss of its logits from the
    `teacher`'s (B, T, V), computed a chunk of rows at a time (`anyshape.model.head`)."""
    check_kind(kind)
    teacher_rows = teacher.detach().flatten(0, 1)

    def rows_loss(logits: Tensor, rows: slice) -> Tensor:
        return distillation_loss(kind, logits, teacher_rows[rows]) * (rows.stop - rows.start)

    def loss(hidden: Tensor, weight: Tensor) -> Tensor:
        return head_loss(hidden.flatten(0, 1), weight, rows_loss, chunk_rows(len(weight))) / len(teacher_rows)

    return loss


def check_kind(kind: str) -> None:
    """Raises AnyshapeError unless `kind` is one of KD_LOSSES."""
    if kind not in KD_LOSSES:
        raise AnyshapeError(f"unknown distillation loss {kind!r}; choose one of {', '.join(KD_LOSSES)}, or none")


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Mean over rows of KL(p || q), from log-probabilities (N, V)."""
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


class LossBalancer:
    """Loss-magnitude balancing (AmoebaLLM): each sampler slot's loss is scaled by
    (running mean of the first slot's loss) / (running mean of its own), so no Shape's loss
    magnitude dominates the shared gradient. Running means are exponential (`momentum`) of
    detached values, and are part of a checkpoint (`state_dict`)."""

    def __init__(self, momentum: float = 0.9):
        self.momentum = momentum
        self.means: dict[str, float] = {}

    def update(self, slot: str, value: float) -> None:
        """Records a slot's detached loss value (the same on every process of a DDP run)."""
        previous = self.means.get(slot)
        self.means[slot] = value if previous is None else self.momentum * previous + (1 - self.momentum) * value

    def scale(self, slot: str) -> float:
        """The factor for `slot`'s loss: 1 for the first slot seen and for unseen slots."""
        reference = next(iter(self.means.values()), None)
        own = self.means.get(slot)
        return 1.0 if reference is None or not own else reference / own

    def state_dict(self) -> dict[str, object]:
        return {"momentum": self.momentum, "means": dict(self.means)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.momentum = float(state["momentum"])
        self.means = dict(state["means"])
