"""Stage 1, single-layer warm-up: fit each replaced layer's recovery to the original layer.

For each replaced layer i, with x_i (N, T, H) its inputs and y_i = layer_i(x_i) its outputs in
the ORIGINAL model (recorded by forward hooks before the plan is applied), minimise

    L_i = mean |shared_layer_i(x_i) - y_i|^2 / mean |y_i - x_i|^2

over layer i's recovery parameters alone (Adam). The denominator, constant, is the size of the
layer's own update to the residual stream, so a reported error of 1 means "as wrong as skipping
the layer". Layers are independent: their parameters are disjoint and Adam works per
coordinate, so one Adam over sum_i L_i takes exactly the steps each layer's own Adam would, and
all layers train in one pass per step. Errors are measured on a held-out share of the sequences.

Each layer starts from the better, on its fitting sequences, of its recovery's fit of the layer's
own weights (`fit_to_weight`) and direct sharing (no update): in a nonlinear MLP, correcting
gate, up and down projections each by their best low-rank part can move the output further
from the original than sharing the reference's weights unchanged.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from anyshape.errors import DataError
from anyshape.model.llama import DecoderLayer, ElasticLinear, ElasticLlama
from anyshape.shape import Shape
from anyshape.share.recovery import zero_update


@dataclass(frozen=True)
class LayerFit:
    """Held-out errors of one replaced layer (relative to its update, see the module docstring)."""

    layer: int
    direct: float  # the reference's weights alone (direct sharing, no recovery)
    initial: float  # the starting point: the better, on the fitting sequences, of direct sharing and
    # the recovery's fit of the layer's own weights
    final: float  # after the warm-up

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def record_layers(
    model: ElasticLlama, input_ids: Tensor, layers: tuple[int, ...], batch_size: int = 4
) -> dict[int, tuple[Tensor, Tensor]]:
    """(inputs, outputs), each (N, T, H), of every layer in `layers` of the full `model` run on
    input_ids (N, T); tensors on the model's device."""
    records: dict[int, tuple[list[Tensor], list[Tensor]]] = {i: ([], []) for i in layers}

    def keep(module: DecoderLayer, args: tuple, out: Tensor, i: int) -> None:
        records[i][0].append(args[0])
        records[i][1].append(out)

    hooks = [model.model.layers[i].register_forward_hook(functools.partial(keep, i=i)) for i in layers]
    device = model.inv_freq.device
    try:
        for start in range(0, len(input_ids), batch_size):
            model.hidden_states(input_ids[start : start + batch_size].to(device), model.full_shape)
    finally:
        for handle in hooks:
            handle.remove()
    return {i: (torch.cat(inputs), torch.cat(outputs)) for i, (inputs, outputs) in records.items()}


def warm_up(
    model: ElasticLlama,
    records: dict[int, tuple[Tensor, Tensor]],
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 4,
    held_out: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> list[LayerFit]:
    """Fits the recovery parameters of each layer of `records` (a shared model's replaced layers,
    with the original inputs and outputs) for `steps` Adam steps on `batch_size` sequences; the
    last `held_out` share of the sequences only measures. Returns each layer's errors."""
    count = len(next(iter(records.values()))[0])
    val_count = max(1, round(count * held_out))
    if count - val_count < 1:
        raise DataError(f"the warm-up needs at least 2 sequences (1 to fit, 1 held out), got {count}")
    layers = {i: model.model.layers[i] for i in records}
    T = next(iter(records.values()))[0].shape[1]
    rope = model.rope(T, next(iter(records.values()))[0].dtype)
    train = {i: (x[:-val_count], y[:-val_count]) for i, (x, y) in records.items()}
    val = {i: (x[-val_count:], y[-val_count:]) for i, (x, y) in records.items()}

    def errors(split: dict[int, tuple[Tensor, Tensor]]) -> dict[int, float]:
        return {i: _error(layers[i], rope, model.full_shape, *split[i], batch_size) for i in layers}

    with _without_recovery(layers.values()):
        direct, direct_fitting = errors(val), errors(train)
    fitted = errors(train)
    for i, layer in layers.items():  # start from the better of the weight-space fit and direct sharing
        if direct_fitting[i] < fitted[i]:
            for projection in layer.modules():
                if isinstance(projection, ElasticLinear) and projection.adapter is not None:
                    zero_update(projection.adapter)
    initial = errors(val)
    parameters = [p for layer in layers.values() for p in layer.parameters() if p.requires_grad]
    if parameters and steps > 0:
        optimizer = torch.optim.Adam(parameters, lr=lr)
        generator = torch.Generator().manual_seed(seed)
        denominators = {i: (y - x).pow(2).mean() for i, (x, y) in train.items()}
        bar = tqdm(range(steps), desc="warm-up", unit="step", disable=not progress)
        for _ in bar:
            rows = torch.randint(count - val_count, (min(batch_size, count - val_count),), generator=generator)
            loss = sum(
                (layers[i](x[rows], rope, model.full_shape) - y[rows]).pow(2).mean() / denominators[i]
                for i, (x, y) in train.items()
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item() / len(layers):.4f}")
    final = errors(val)
    return [LayerFit(i, direct[i], initial[i], final[i]) for i in layers]


@torch.no_grad()
def _error(layer: DecoderLayer, rope: tuple[Tensor, Tensor], shape: Shape, x: Tensor, y: Tensor, batch: int) -> float:
    """mean |layer(x) - y|^2 / mean |y - x|^2 over x, y (n, T, H)."""
    squared = sum(
        (layer(x[start : start + batch], rope, shape) - y[start : start + batch]).pow(2).sum()
        for start in range(0, len(x), batch)
    )
    return (squared / (y - x).pow(2).sum()).item()


@contextlib.contextmanager
def _without_recovery(layers) -> Iterator[None]:
    """The layers' projections without their recovery (direct sharing), restored afterwards."""
    projections = [m for layer in layers for m in layer.modules() if isinstance(m, ElasticLinear)]
    saved = [p.adapter for p in projections]
    try:
        for p in projections:
            p.adapter = None
        yield
    finally:
        for p, adapter in zip(projections, saved, strict=True):
            p.adapter = adapter
