"""Importance scores for every prunable unit, and their safetensors file.

Metrics (higher = more important):
    activation  activation statistics on calibration text (`importance.activations`)
    magnitude   L2 norm of the weights a unit owns
    taylor      |sum over the weights a unit owns of w * dL/dw|, the first-order estimate of the
                loss change when the unit is removed (L: LM loss on calibration text)
Layer metrics:
    bi          Block Importance, 1 - E[cos(layer input, layer output)]
    drop        Block Drop, the perplexity increase when the layer alone is skipped
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from anyshape.errors import DataError
from anyshape.files import atomic_file
from anyshape.importance.activations import AGGREGATIONS, record_activations
from anyshape.importance.units import UNITS, owned_totals, unit_sizes
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.headers import FLOAT_DTYPES, check_finite, check_tensors, safetensors_header
from anyshape.model.llama import ElasticLlama
from anyshape.model.nll import mean_nll, next_token_nll

METRICS = ("activation", "magnitude", "taylor")
LAYER_METRICS = ("bi", "drop")
METADATA_KEY = "anyshape"
RECOMPUTE = "recompute it with `anyshape importance`"


@dataclass
class Scores:
    """Per-unit importance (layouts in `importance.units`) and how it was computed (`info`)."""

    neurons: Tensor
    heads: Tensor
    kv_groups: Tensor
    channels: Tensor
    layers: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, Tensor]:
        return {unit: getattr(self, unit) for unit in UNITS}

    def check(self, config: LlamaFamilyConfig) -> Scores:
        """Returns self if the score shapes fit `config`; raises DataError naming the mismatch."""
        for unit, expected in unit_sizes(config).items():
            actual = tuple(getattr(self, unit).shape)
            if actual != expected:
                raise DataError(
                    f"these scores do not fit the model: {unit} scores are {actual}, the model needs "
                    f"{expected}; they were computed for another model ({self.info.get('model', '?')}), "
                    "so recompute them with `anyshape importance` on this one"
                )
            if not torch.isfinite(getattr(self, unit)).all():
                raise DataError(f"the {unit} scores contain NaN or inf; recompute them")
        return self

    def save(self, path: str | Path) -> None:
        """Writes a safetensors file, atomically; `info` goes in its header as JSON."""
        tensors = {unit: tensor.contiguous().float() for unit, tensor in self.tensors().items()}
        with atomic_file(path) as temporary:
            save_file(tensors, temporary, metadata={METADATA_KEY: json.dumps(self.info)})

    @classmethod
    def load(cls, path: str | Path, config: LlamaFamilyConfig | None = None) -> Scores:
        """Reads a scores file (its header checked first, its values finite); with `config`, also
        checks that the scores fit that model."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"scores file {str(path)!r} not found; make one with `anyshape importance`")
        unreadable = f"it is not a readable scores file; {RECOMPUTE}"
        check_tensors(path, safetensors_header(path, unreadable, DataError), None, FLOAT_DTYPES, unreadable, DataError)
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as file:
                info = json.loads((file.metadata() or {}).get(METADATA_KEY, "{}"))
        except (SafetensorError, OSError, ValueError, RecursionError) as error:
            raise DataError(f"{path} is not a readable scores file ({error}); recompute it") from None
        if not isinstance(info, dict):
            raise DataError(
                f"{path} has a {type(info).__name__} as its {METADATA_KEY!r} header, not a JSON object; {RECOMPUTE}"
            )
        missing = [unit for unit in UNITS if unit not in tensors]
        if missing:
            raise DataError(f"{path} has no {missing[0]} scores; it is not an anyshape scores file")
        check_finite(path, {unit: tensors[unit] for unit in UNITS}, RECOMPUTE, DataError)
        scores = cls(**{unit: tensors[unit] for unit in UNITS}, info=info)
        return scores.check(config) if config is not None else scores


def magnitude_scores(model: ElasticLlama) -> dict[str, Tensor]:
    """L2 norm of the weights each unit owns."""
    squares = {name: p.detach().float() ** 2 for name, p in model.named_parameters()}
    return {unit: total.sqrt() for unit, total in owned_totals(model.config, squares).items()}


def taylor_scores(
    model: ElasticLlama, input_ids: Tensor, batch_size: int = 4, progress: bool = False
) -> dict[str, Tensor]:
    """|sum of w * dL/dw| over the weights each unit owns, dL/dw summed over calibration batches."""
    parameters = dict(model.named_parameters())
    gradients = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in parameters.items()}
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(input_ids), batch_size), desc="taylor", unit="batch", disable=not progress):
        batch = input_ids[start : start + batch_size].to(model.inv_freq.device)
        logits = model(batch)
        loss = next_token_nll(logits, batch)
        grads = torch.autograd.grad(loss, list(parameters.values()))
        for name, grad in zip(parameters, grads, strict=True):
            gradients[name] += grad.float()
    model.train(was_training)
    products = {name: p.detach().float() * gradients[name] for name, p in parameters.items()}
    return {unit: total.abs() for unit, total in owned_totals(model.config, products).items()}


@torch.no_grad()
def block_drop(model: ElasticLlama, input_ids: Tensor, batch_size: int = 4, progress: bool = False) -> Tensor:
    """(L,) perplexity increase on the calibration batches when each layer alone is skipped."""
    full = model.full_shape
    base = math.exp(mean_nll(model, input_ids, full, batch_size))
    increases = []
    for i in tqdm(full.layers, desc="block drop", unit="layer", disable=not progress):
        shape = replace(full, layers=tuple(layer for layer in full.layers if layer != i))
        increases.append(math.exp(mean_nll(model, input_ids, shape, batch_size)) - base)
    return torch.tensor(increases)


def score(
    model: ElasticLlama,
    input_ids: Tensor,
    metric: str = "activation",
    agg_batch: str = "mean",
    agg_seq: str = "mean",
    layer_metric: str = "bi",
    batch_size: int = 4,
    progress: bool = False,
) -> Scores:
    """Scores every unit of `model` on calibration input_ids (N, S)."""
    for value, allowed, option in (
        (metric, METRICS, "metric"),
        (layer_metric, LAYER_METRICS, "layer metric"),
        (agg_batch, AGGREGATIONS, "batch aggregation"),
        (agg_seq, AGGREGATIONS, "sequence aggregation"),
    ):
        if value not in allowed:
            raise DataError(f"unknown {option} {value!r}; choose one of {', '.join(allowed)}")
    if model.config.num_hidden_layers < 2 and layer_metric == "drop":
        raise DataError("block drop needs at least 2 layers")
    record = None
    if metric == "activation" or layer_metric == "bi":
        record = record_activations(model, input_ids, batch_size, progress)
    if metric == "activation":
        units = record.scores(agg_batch, agg_seq)
    elif metric == "magnitude":
        units = magnitude_scores(model)
    else:
        units = taylor_scores(model, input_ids, batch_size, progress)
    layers = record.bi if layer_metric == "bi" else block_drop(model, input_ids, batch_size, progress)
    info = {
        "metric": metric,
        "agg_batch": agg_batch if metric == "activation" else None,
        "agg_seq": agg_seq if metric == "activation" else None,
        "layer_metric": layer_metric,
        "num_sequences": int(input_ids.shape[0]),
        "sequence_length": int(input_ids.shape[1]),
    }
    return Scores(
        neurons=units["neurons"],
        heads=units["heads"],
        kv_groups=units["kv_groups"],
        channels=units["channels"],
        layers=layers,
        info=info,
    ).check(model.config)


SCORES_FILENAME = "importance.safetensors"  # beside the weights of a folder `anyshape sort` wrote


def scores_beside(folder: Path, config: LlamaFamilyConfig) -> Scores | None:
    """The scores `anyshape sort` leaves in a sorted model folder (already in its order), if any."""
    path = Path(folder) / SCORES_FILENAME
    return Scores.load(path, config) if path.is_file() else None
