"""Seconds of forward + backward per Shape slot of a training step, without host syncs between slots."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class SlotTimer:
    """Times spans of a step by slot: with CUDA events on a GPU, which the host reads once the
    device has passed them (the step's one read), so timing never stalls the queue; with the
    wall clock elsewhere, where an operation's work is done when its call returns."""

    def __init__(self, device: torch.device):
        self.events = device.type == "cuda"
        self.spans: list[tuple[str, object, object]] = []

    @contextmanager
    def span(self, slot: str) -> Iterator[None]:
        """Times the block as part of `slot`."""
        if self.events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.spans.append((slot, start, end))

    def seconds(self) -> dict[str, float]:
        """Seconds per slot, summed over its spans; on a GPU, read after the device has finished them."""
        totals: dict[str, float] = {}
        for slot, start, end in self.spans:
            elapsed = start.elapsed_time(end) / 1000 if self.events else end - start
            totals[slot] = totals.get(slot, 0.0) + elapsed
        return totals
