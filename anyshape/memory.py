"""An up-front estimate of a training run's peak memory, checked before anything is allocated.

A step holds the weights, the trainable parameters' gradients and AdamW moments, the saved
activations of one forward pass (each Shape's backward runs before the next Shape's forward) and
the logits (the student's, their log-softmax and gradient, the no-grad teacher's), and a frozen
teacher's weights when one teaches instead of the largest Shape. Per token
and decoder layer, the forward saves about 4H + 5 Q d + 3 G d + 4F + Q T values (norm inputs and
outputs; queries, keys, values, rotated copies and attention output; gate, up, their activation
and product; attention probabilities, which a CPU attention keeps), and with adapters 5H + Q d + F
more (each adapted projection's input, again). With activation checkpointing the forward keeps
only each layer's input (H per token and layer) and one layer's activations at a time, while
its backward recomputes them. On SmolLM2-135M in float32 on the CPU the estimate
is within 10% of the measured peak (bench/memory.py, docs/reliability.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psutil
import torch

from anyshape.errors import AnyshapeError
from anyshape.model.config import LlamaFamilyConfig
from anyshape.shape import Shape

GiB = 2**30
UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
RUNTIME_BYTES = 2**30  # the interpreter, torch, transformers, the tokenizer and allocator slack


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of each part of a training step's peak."""

    weights: int
    optimizer: int  # gradients and AdamW's two moments of the trainable parameters
    activations: int
    logits: int
    teacher: int = 0  # a frozen teacher's weights

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.logits + self.teacher + RUNTIME_BYTES

    def describe(self) -> str:
        parts = {"weights": self.weights, "gradients and optimizer": self.optimizer}
        parts |= {"activations": self.activations, "logits": self.logits}
        parts |= ({"teacher": self.teacher} if self.teacher else {}) | {"runtime": RUNTIME_BYTES}
        return f"{self.total / GiB:.1f} GiB (" + ", ".join(f"{k} {v / GiB:.1f}" for k, v in parts.items()) + ")"


def training_memory(
    config: LlamaFamilyConfig,
    shape: Shape,
    sequences: int,
    seq_len: int,
    parameters: int,
    trainable: int,
    adapters: bool = False,
    bytes_per_value: int = 4,
    teacher_parameters: int = 0,
    teacher_bytes_per_value: int = 4,
    checkpointing: bool = False,
) -> MemoryEstimate:
    """The peak of one training step of `shape` on a micro-batch of `sequences` x `seq_len`
    tokens, with `parameters` weights of which `trainable` learn (AdamW), through `adapters` or not,
    beside a frozen teacher of `teacher_parameters` weights of `teacher_bytes_per_value` bytes each
    (its logits take the place of the largest Shape's no-grad ones, already counted), with layer
    `checkpointing` or not."""
    d, groups, queries = config.head_dim, shape.num_key_value_heads, shape.num_attention_heads
    per_layer = 4 * shape.hidden_size + 5 * queries * d + 3 * groups * d + 4 * shape.intermediate_size
    per_layer += queries * seq_len
    if adapters:
        per_layer += 5 * shape.hidden_size + queries * d + shape.intermediate_size
    tokens = sequences * seq_len
    kept = shape.hidden_size * len(shape.layers) + per_layer if checkpointing else per_layer * len(shape.layers)
    activations = tokens * kept * bytes_per_value
    logits = 4 * tokens * config.vocab_size * 4  # float32: logits, log-softmax, its gradient, the teacher's
    teacher = teacher_parameters * teacher_bytes_per_value
    return MemoryEstimate(parameters * bytes_per_value, 3 * trainable * 4, activations, logits, teacher)


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
