"""An up-front estimate of a training run's peak memory, checked before anything is allocated.

A step holds the weights, AdamW's two moments of the trainable parameters and their gradients
(where one backward pass's gradients wait through another's: several Shapes or micro-batches a
step), the tensors autograd saves in one forward pass (each Shape's backward runs before the next
Shape's forward), the logits, and a frozen teacher's weights when one teaches instead of the
largest Shape. Per token and decoder layer the forward saves, counted from autograd's saved
tensors: each norm's input, and its normalised input where the norm's weight learns (float32, as
the residual stream is under autocast); the projections' inputs (two norm outputs, the attention
output: 2H + Q d; under autocast q, k, v, gate and up each keep their own cast of theirs: 5H +
Q d), the rotated queries, keys and values (Q d + 2 G d), and the MLP's gate, up, activation and
product (4F), in the autocast dtype; an attention log-sum-exp per query head. LoRA adds each
adapted projection's rank-r middle A x, SMOL each chosen expert's, before and after its mixture
weight; a sliding-window mask keeps SDPA off its fused kernels and adds Q T probabilities. Per
Shape, not per token: the weights cast to the autocast dtype for its matmuls, or, without
autocast, the query and output projections' weights where dropping query heads inside a group
slices them by copy. With activation checkpointing the forward keeps only each layer's input (H
per token and layer) and one layer's activations at a time. The losses read the LM head a chunk of rows at a time
(`anyshape.model.head`), so the logits are one chunk's (logits, softmax, gradient in float32),
the teacher's whole (B, S, V) in the autocast dtype, and the head's gradient.

`runtime` is what the process holds besides these tensors: on the CPU, measured when the plan is
made (the interpreter, torch, the tokenizer, the data); on a GPU nothing, as the CUDA context is
already out of the free memory the plan is checked against. bench/memory.py compares the plan
with measured peaks (docs/reliability.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psutil
import torch

from anyshape.errors import AnyshapeError
from anyshape.model.adapters import PROJECTIONS
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.head import chunk_rows
from anyshape.shape import Shape

GiB = 2**30
UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part of a training step's peak."""

    weights: int
    optimizer: int  # AdamW's two moments of the trainable parameters, and their gradients
    activations: int
    logits: int
    teacher: int = 0  # a frozen teacher's weights
    runtime: int = 0  # what the process holds besides tensors (`runtime_bytes`)

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.logits + self.teacher + self.runtime

    def parts(self) -> dict[str, int]:
        """Bytes by part, named as `describe` names them."""
        parts = {"weights": self.weights, "gradients and optimizer": self.optimizer}
        parts |= {"activations": self.activations, "logits": self.logits}
        return parts | ({"teacher": self.teacher} if self.teacher else {}) | {"runtime": self.runtime}

    def describe(self) -> str:
        parts = ", ".join(f"{name} {size / GiB:.1f}" for name, size in self.parts().items())
        return f"{self.total / GiB:.1f} GiB ({parts})"


def training_memory(
    config: LlamaFamilyConfig,
    shape: Shape,
    sequences: int,
    seq_len: int,
    parameters: int,
    trainable: int,
    adapter: str = "full",
    rank: int = 16,
    top_k: int = 1,
    bytes_per_value: int = 4,
    teacher_parameters: int = 0,
    teacher_bytes_per_value: int = 4,
    checkpointing: bool = False,
    autocast_bytes: int = 4,
    teacher_logits: bool = True,
    accumulates: bool = True,
    shards: int = 1,
    runtime: int = 0,
) -> MemoryEstimate:
    """The peak of one training step of `shape` on a micro-batch of `sequences` x `seq_len`
    tokens, with `parameters` weights of which `trainable` learn (AdamW), the weights themselves
    ("full") or a `rank`-r "lora" or "smol" `adapter` (`top_k` experts a Shape) on every
    projection, beside a frozen teacher of `teacher_parameters` weights of
    `teacher_bytes_per_value` bytes each, with layer `checkpointing` or not. `autocast_bytes`: 2
    under bfloat16 autocast, else 4; `teacher_logits`: whether the step holds a teacher's logits
    (distillation); `accumulates`: whether one backward pass's gradients are held through
    another's (several Shapes or micro-batches a step; a lone backward frees activations as its
    gradients fill in); `shards`: the processes FSDP splits weights, gradients and moments over
    (each then holds its share, and one decoder layer's whole weights while it computes);
    `runtime`: bytes the process holds besides tensors (`runtime_bytes`)."""
    d, groups, queries = config.head_dim, shape.num_key_value_heads, shape.num_attention_heads
    hidden, mlp = shape.hidden_size, shape.intermediate_size
    norms_learn = adapter == "full" and trainable > 0
    residual = (4 if norms_learn else 2) * hidden + queries + 2  # float32: norm inputs (and normalised), lse, rms
    casts = autocast_bytes < bytes_per_value  # each of q, k, v, gate and up keeps its own cast of its input
    products = (5 if casts else 2) * hidden + 2 * queries * d + 2 * groups * d + 4 * mlp
    if config.sliding_window is not None and seq_len > config.sliding_window:
        products += queries * seq_len  # a masked attention keeps its probabilities
    if adapter != "full":  # each adapter's A x; SMOL's also times its mixture weights
        products += len(PROJECTIONS) * rank * (2 * top_k if adapter == "smol" else 1)
    per_layer = residual * bytes_per_value + products * autocast_bytes  # bytes per token
    tokens, layers = sequences * seq_len, len(shape.layers)
    if checkpointing:
        activations = tokens * (hidden * layers * bytes_per_value + per_layer)
    else:
        activations = tokens * per_layer * layers
    activations += tokens * ((2 if norms_learn else 1) * hidden + 1) * bytes_per_value  # the final norm's
    if casts:  # and each projection's weight its cast
        activations += shape.num_parameters(config) * autocast_bytes
    elif shape.queries_per_group < config.queries_per_group:  # the q and o weights, sliced by copy
        activations += layers * 2 * queries * d * hidden * bytes_per_value
    vocab = config.vocab_size
    logits = 3 * min(tokens, chunk_rows(vocab)) * vocab * 4  # a chunk of the loss: logits, softmax, gradient
    logits += tokens * vocab * autocast_bytes if teacher_logits else 0
    logits += tokens * hidden * 4  # the loss's gradient for the final hidden states
    if trainable and adapter == "full":
        logits += vocab * hidden * 4  # and for the head's weight
    optimizer = (3 if accumulates else 2) * trainable * 4 // shards
    weights = parameters * bytes_per_value // shards
    if shards > 1:  # the layer FSDP has gathered
        weights += shape.num_parameters(config) // config.num_hidden_layers * bytes_per_value
    teacher = teacher_parameters * teacher_bytes_per_value
    return MemoryEstimate(weights, optimizer, activations, logits, teacher, runtime)


def runtime_bytes(device: torch.device, held: int = 0) -> int:
    """Bytes the process holds besides a step's tensors: on the CPU its resident memory now,
    less the `held` bytes of weights already loaded; on a GPU 0 (the CUDA context is already out
    of `available_memory`)."""
    if device.type == "cuda":
        return 0
    return max(psutil.Process().memory_info().rss - held, 0)


def parse_size(text: str) -> int:
    """Bytes of a size such as "8GiB", "8G", "512MB" or "1.5g" (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if match is None or float(match.group(1)) <= 0:
        raise AnyshapeError(f"cannot read the size {text!r}; write a positive number and a unit, e.g. 8GiB or 512MiB")
    return int(float(match.group(1)) * UNITS[match.group(2)])


def available_memory(device: torch.device) -> int:
    """Bytes free for a run on `device`: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_allocation(size: int, what: str, fix: str) -> None:
    """Raises AnyshapeError when `size` bytes exceed the host memory available now."""
    free = psutil.virtual_memory().available
    if size > free:
        raise AnyshapeError(f"{what} needs {size / GiB:.1f} GiB, more than the {free / GiB:.1f} GiB available; {fix}")


def check_memory(estimate: MemoryEstimate, limit: int, what: str, fix: str) -> None:
    """Raises AnyshapeError with the estimate when it exceeds `limit` bytes."""
    if estimate.total > limit:
        raise AnyshapeError(
            f"{what} needs about {estimate.describe()}, more than the {limit / GiB:.1f} GiB allowed; {fix}"
        )
