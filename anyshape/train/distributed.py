"""This process's place in a torchrun launch, and what a distributed run does differently:
the process group, DDP or FSDP wrapping, gradient synchronisation, averages over processes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from anyshape.model.llama import ElasticLlama, rope_frequencies
from anyshape.model.load import RowReader


@dataclass
class Distributed:
    """This process's place in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> Distributed:
        return cls(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@contextlib.contextmanager
def process_group(world: Distributed, device: torch.device) -> Iterator[None]:
    """Within this block a distributed launch has its process group (NCCL on CUDA, else gloo),
    unless the caller already made one."""
    owns_group = world.enabled and not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def device_for(world: Distributed) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def wrap(model: ElasticLlama, device: torch.device, world: Distributed, strategy: str, adapters: bool) -> nn.Module:
    """The model as this run trains it: itself in one process; in a distributed run, DDP (finding
    unused parameters where adapters may leave some without a gradient) or FSDP, sharded per
    decoder layer and at the root (embeddings, final norm, LM head)."""
    if not world.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=adapters)


def fill_shards(model: ElasticLlama, rows: RowReader, device: torch.device) -> None:
    """Materialises on `device` a model built on the meta device and sharded by FSDP, each
    parameter's local rows read from the checkpoint by `rows`: no process holds the whole
    model. FSDP splits every parameter by rows as torch.chunk does (ceil(n / world) rows each)."""
    model.to_empty(device=device)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            local = parameter.to_local()
            total, parts = parameter.shape[0], parameter.device_mesh.size()
            start = min(-(-total // parts) * parameter.device_mesh.get_local_rank(), total)
            local.copy_(rows(name, start, start + local.shape[0]))
        model.inv_freq.copy_(rope_frequencies(model.config)[0])


@contextlib.contextmanager
def no_sync(model: nn.Module) -> Iterator[None]:
    """Gradients accumulate locally, without the all-reduce (DDP) or reduce-scatter (FSDP)."""
    if hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def barrier(world: Distributed) -> None:
    if world.enabled:
        torch.distributed.barrier()


def average_over_processes(module: nn.Module, world: Distributed) -> None:
    """Averages `module`'s gradients over the processes (the router: used outside DDP/FSDP)."""
    if world.enabled:
        for parameter in module.parameters():
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad /= world.world_size


def mean_over_processes(value: Tensor, world: Distributed) -> Tensor:
    """The mean of `value` over the processes (`value` itself in one process); not read to the host."""
    if world.enabled:
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= world.world_size
    return value
