"""Continuous batching over one copy of the weights: requests for any Shapes of one model, each
decoded through a KV cache of its own.

    submit(request)  ->  the waiting queue (bounded: QueueFull when it is full)
    the engine's thread, round after round:
        admit waiting requests, in order, whose Shape runs fewer than `max_batch`: prefill each alone
        for each Shape with running requests: one decode step of all of them together
        a request leaves at a stop token, after its max_tokens, or when cancelled

Every request's tokens are chosen as `Decoder.generate` chooses them (`next_token`, a generator
seeded with the request's seed), so a greedy answer is the `anyshape chat` answer token for token.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from anyshape.errors import AnyshapeError
from anyshape.model.llama import ElasticLlama, KVCache
from anyshape.runtime.generate import Sampling, next_token
from anyshape.shape import Shape

STOP, LENGTH = "stop", "length"  # why a request ended (OpenAI's finish_reason)


class QueueFull(AnyshapeError):
    """The waiting queue is full: try again later."""


class Closed(AnyshapeError):
    """The engine is shutting down and takes no new requests."""


@dataclass(eq=False)
class Request:
    """One generation: `on_token(token)` for each new token, then `on_finish(reason)` once, where
    reason is STOP, LENGTH, or an error's message; both are called on the engine's thread."""

    prompt: list[int]
    shape: Shape
    max_tokens: int
    sampling: Sampling
    stop_tokens: frozenset[int]
    on_token: Callable[[int], None]
    on_finish: Callable[[str], None]
    cancelled: bool = False  # set from any thread: the request leaves before its next step


@dataclass(eq=False)
class Running:
    """A request being decoded: its cache and sampler, and the last token chosen (not yet run)."""

    request: Request
    cache: KVCache
    generator: torch.Generator
    last: int = -1
    produced: int = 0


@dataclass
class ShapeLoad:
    """Work of one Shape: requests waiting and running now; tokens made and seconds spent so far."""

    waiting: int = 0
    running: int = 0
    tokens: int = 0
    seconds: float = 0.0


class Engine:
    """One model serving requests for any of its Shapes, on a thread of its own."""

    def __init__(self, model: ElasticLlama, max_batch: int = 8, max_waiting: int = 64):
        """`max_batch`: requests of one Shape decoded together at most; `max_waiting`: requests
        queued at most beyond those."""
        if max_batch < 1 or max_waiting < 0:
            raise AnyshapeError(f"max_batch={max_batch} must be >= 1 and max_waiting={max_waiting} >= 0")
        self.model, self.max_batch, self.max_waiting = model, max_batch, max_waiting
        self.device = model.inv_freq.device
        self._waiting: deque[Request] = deque()
        self._running: list[Running] = []
        self._work = threading.Condition()
        self._closing = False
        self._load: dict[Shape, ShapeLoad] = {}
        self._thread = threading.Thread(target=self._serve, name="anyshape-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def refuse_new(self) -> None:
        """From now on `submit` raises Closed; the requests it has are still served."""
        with self._work:
            self._closing = True
            self._work.notify()

    def close(self) -> None:
        """Takes no new requests, finishes those it has, then stops its thread."""
        self.refuse_new()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def closing(self) -> bool:
        return self._closing

    def submit(self, request: Request) -> None:
        """Queues `request`; QueueFull if `max_waiting` requests wait already, Closed if closing."""
        if request.max_tokens < 1 or not request.prompt:
            raise AnyshapeError("a request needs a prompt of at least one token and max_tokens >= 1")
        with self._work:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self._waiting)} requests are waiting already")
            self._waiting.append(request)
            self._work.notify()

    def load(self) -> dict[Shape, ShapeLoad]:
        """Per Shape: how many requests wait and run now, tokens made and seconds spent so far."""
        with self._work:
            loads = {shape: ShapeLoad(0, 0, load.tokens, load.seconds) for shape, load in self._load.items()}
            for request in self._waiting:
                loads.setdefault(request.shape, ShapeLoad()).waiting += 1
            for running in self._running:
                loads.setdefault(running.request.shape, ShapeLoad()).running += 1
        return loads

    def _serve(self) -> None:
        while True:
            with self._work:
                while not (self._waiting or self._running or self._closing):
                    self._work.wait()
                if self._closing and not (self._waiting or self._running):
                    return
                admitted = self._admit()
            for request in admitted:
                self._start(request)
            for shape in dict.fromkeys(running.request.shape for running in self._running):
                self._step([running for running in self._running if running.request.shape == shape])

    def busy(self, shape: Shape) -> bool:
        """Whether a request for `shape` would wait: `max_batch` of its requests run already."""
        with self._work:
            return sum(running.request.shape == shape for running in self._running) >= self.max_batch

    def _admit(self) -> list[Request]:
        """Takes from the queue, in order, each request whose Shape has room (the lock held)."""
        room = {}
        for running in self._running:
            room[running.request.shape] = room.get(running.request.shape, self.max_batch) - 1
        admitted, kept = [], deque()
        for request in self._waiting:
            free = room.get(request.shape, self.max_batch)
            (admitted if free > 0 else kept).append(request)
            room[request.shape] = free - 1
        self._waiting = kept
        return admitted

    @torch.inference_mode()
    def _start(self, request: Request) -> None:
        """Prefills `request` alone and chooses its first token."""
        if request.cancelled:
            return
        running = Running(request, KVCache(request.shape), torch.Generator(self.device))
        running.generator.manual_seed(request.sampling.seed)
        with self._work:
            self._running.append(running)
        self._advance([running], torch.tensor([request.prompt], device=self.device))

    @torch.inference_mode()
    def _step(self, group: list[Running]) -> None:
        """One decode step of the running requests of one Shape, together."""
        live = [running for running in group if not running.request.cancelled]
        self._finish([running for running in group if running.request.cancelled], None)
        if live:
            self._advance(live, torch.tensor([[running.last] for running in live], device=self.device))

    def _advance(self, group: list[Running], input_ids: torch.Tensor) -> None:
        """Runs input_ids (B, T) after each row's cache and chooses each row's next token."""
        shape = group[0].request.shape
        started = time.perf_counter()
        try:
            caches = group[0].cache if len(group) == 1 else [running.cache for running in group]
            hidden = self.model.hidden_states(input_ids, shape, caches)[:, -1]  # (B, H')
            logits = self.model.lm_head_logits(hidden, shape)  # (B, V)
        except Exception as error:  # one failing batch must not stop the server
            self._finish(group, f"{type(error).__name__}: {error}")
            return
        done: dict[str, list[Running]] = {STOP: [], LENGTH: []}
        for running, row in zip(group, logits, strict=True):
            request = running.request
            token = next_token(row, request.sampling, running.generator)
            if token in request.stop_tokens:
                done[STOP].append(running)
                continue
            running.last, running.produced = token, running.produced + 1
            request.on_token(token)
            if running.produced >= request.max_tokens:
                done[LENGTH].append(running)
        with self._work:
            load = self._load.setdefault(shape, ShapeLoad())
            load.tokens += len(group)
            load.seconds += time.perf_counter() - started
        for reason, finished in done.items():
            self._finish(finished, reason)

    def _finish(self, group: list[Running], reason: str | None) -> None:
        """Removes `group` from the running requests and tells each why it ended (None: cancelled, told nothing)."""
        if not group:
            return
        with self._work:
            self._running = [running for running in self._running if running not in group]
        if reason is not None:
            for running in group:
                running.request.on_finish(reason)
