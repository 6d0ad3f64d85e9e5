"""Relative Perplexity Decrease: how much sorting by a scoring scheme helps random Shapes.

RPD = (1/N) sum_i (PPL_i unsorted - PPL_i sorted) / PPL_i unsorted over N random Shapes
(2410.06479, appendix). Higher is better; 0 means sorting did not help.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from anyshape.errors import DataError
from anyshape.importance.activations import AGGREGATIONS
from anyshape.importance.permute import sort_
from anyshape.importance.scores import METRICS, score
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama
from anyshape.model.nll import mean_nll
from anyshape.shape import Shape

FRACTIONS = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
DEFAULT_SCHEMES = ("activation:mean:mean", "activation:norm:mean", "magnitude")


@dataclass(frozen=True)
class Scheme:
    """A scoring scheme, written `metric[:agg_batch:agg_seq]`, e.g. `activation:norm:mean`."""

    metric: str
    agg_batch: str = "mean"
    agg_seq: str = "mean"

    @classmethod
    def parse(cls, text: str) -> Scheme:
        parts = text.strip().split(":")
        if parts[0] not in METRICS or len(parts) not in (1, 3) or (len(parts) == 3 and parts[0] != "activation"):
            raise DataError(
                f"scheme {text!r} is not one of: magnitude, taylor, activation, activation:AGG_B:AGG_S "
                f"with AGG in {', '.join(AGGREGATIONS)}"
            )
        scheme = cls(*parts)
        for aggregation in (scheme.agg_batch, scheme.agg_seq):
            if aggregation not in AGGREGATIONS:
                raise DataError(
                    f"scheme {text!r}: unknown aggregation {aggregation!r}; choose from {', '.join(AGGREGATIONS)}"
                )
        return scheme

    def __str__(self) -> str:
        return f"activation:{self.agg_batch}:{self.agg_seq}" if self.metric == "activation" else self.metric


def random_shapes(config: LlamaFamilyConfig, count: int, seed: int = 0) -> list[Shape]:
    """`count` Shapes keeping every layer, each width a random fraction of the parent's from
    FRACTIONS (KV groups and query heads per group drawn separately)."""
    generator = torch.Generator().manual_seed(seed)

    def pick(size: int) -> int:
        fraction = FRACTIONS[int(torch.randint(len(FRACTIONS), (1,), generator=generator))]
        return max(1, round(fraction * size))

    shapes = []
    for _ in range(count):
        groups, per_group = pick(config.num_key_value_heads), pick(config.queries_per_group)
        shapes.append(
            Shape(
                tuple(range(config.num_hidden_layers)),
                pick(config.hidden_size),
                groups * per_group,
                groups,
                pick(config.intermediate_size),
            ).validate(config)
        )
    return shapes


@dataclass
class RPDResult:
    scheme: str
    rpd: float
    mean_perplexity_sorted: float
    mean_perplexity_unsorted: float

    def to_dict(self) -> dict:
        return dict(vars(self))


def relative_perplexity_decrease(
    model: ElasticLlama,
    calibration_ids: Tensor,
    evaluation_ids: Tensor,
    schemes: list[Scheme],
    samples: int = 50,
    seed: int = 0,
    batch_size: int = 4,
    progress: bool = False,
) -> list[RPDResult]:
    """RPD of each scheme over `samples` random Shapes. Scores come from calibration_ids (N, S);
    perplexities from evaluation_ids (M, S'). `model` is restored to its original weights."""
    shapes = random_shapes(model.config, samples, seed)
    unsorted = [
        math.exp(mean_nll(model, evaluation_ids, s, batch_size))
        for s in tqdm(shapes, desc="unsorted shapes", unit="shape", disable=not progress)
    ]
    original = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    results = []
    try:
        for scheme in schemes:
            scores = score(
                model,
                calibration_ids,
                scheme.metric,
                scheme.agg_batch,
                scheme.agg_seq,
                batch_size=batch_size,
                progress=progress,
            )
            sort_(model, scores)
            sorted_ppl = [
                math.exp(mean_nll(model, evaluation_ids, s, batch_size))
                for s in tqdm(shapes, desc=f"sorted by {scheme}", unit="shape", disable=not progress)
            ]
            model.load_state_dict(original)
            decrease = [(u - s) / u for u, s in zip(unsorted, sorted_ppl, strict=True)]
            results.append(
                RPDResult(str(scheme), sum(decrease) / samples, sum(sorted_ppl) / samples, sum(unsorted) / samples)
            )
    finally:
        model.load_state_dict(original)
    return results
