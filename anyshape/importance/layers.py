"""Depth selection: which k of the L layers to keep.

Methods (the quality metric is the full-width model's perplexity on calibration sequences):
    bi     one-shot ranking: keep the k layers with the highest layer score (Block Importance
           unless other layer scores are given)
    drop   ShortGPT-style, iterative: remove the layer with the lowest Block Importance,
           re-measured on the remaining layers, until k remain
    dp     AmoebaLLM's dynamic programme. best[n][k] is the best set of k kept layers among the
           first n, judged with layers n..L-1 all kept; best[n][k] is the better of
           best[n-1][k] and best[n-1][k-1] + {n-1}. One pass gives the best set for every depth,
           with O(L^2) evaluations (fewer when only one depth is asked for).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from anyshape.errors import DataError
from anyshape.model.llama import ElasticLlama
from anyshape.model.nll import mean_nll

METHODS = ("dp", "bi", "drop")


@dataclass
class DepthSelection:
    """Kept layers and calibration perplexity for each depth; `evaluations` counts model runs."""

    method: str
    layers: dict[int, tuple[int, ...]]
    perplexity: dict[int, float]
    evaluations: int = 0
    seconds: float = 0.0
    candidates: dict[frozenset[int], float] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 2),
            "depths": [
                {"keep": k, "layers": list(self.layers[k]), "perplexity": self.perplexity[k]}
                for k in sorted(self.layers, reverse=True)
            ],
        }


class SubsetEvaluator:
    """Calibration perplexity of the full-width model keeping a set of layers, memoised."""

    def __init__(self, model: ElasticLlama, input_ids: Tensor, batch_size: int, progress: bool):
        self.model, self.input_ids, self.batch_size = model, input_ids, batch_size
        self.cache: dict[frozenset[int], float] = {}
        self.bar = tqdm(desc="layer subsets", unit="eval", disable=not progress)

    def __call__(self, layers: frozenset[int]) -> float:
        if layers not in self.cache:
            shape = replace(self.model.full_shape, layers=tuple(sorted(layers)))
            self.cache[layers] = math.exp(mean_nll(self.model, self.input_ids, shape, self.batch_size))
            self.bar.update()
        return self.cache[layers]


@torch.no_grad()
def block_importance(
    model: ElasticLlama, input_ids: Tensor, layers: tuple[int, ...], batch_size: int = 4
) -> dict[int, float]:
    """BI_i = 1 - mean cosine(input, output) of each layer i of the model keeping `layers`."""
    cosine_sum = dict.fromkeys(layers, 0.0)
    hooks = []
    for i in layers:

        def hook(module, args, out, i=i):
            cosine_sum[i] += F.cosine_similarity(args[0].float(), out.float(), dim=-1).sum().item()

        hooks.append(model.model.layers[i].register_forward_hook(hook))
    shape = replace(model.full_shape, layers=layers)
    try:
        for start in range(0, len(input_ids), batch_size):
            model(input_ids[start : start + batch_size].to(model.inv_freq.device), shape)
    finally:
        for handle in hooks:
            handle.remove()
    tokens = input_ids.numel()
    return {i: 1 - total / tokens for i, total in cosine_sum.items()}


def select_layers(
    model: ElasticLlama,
    input_ids: Tensor,
    method: str = "dp",
    keep: int | None = None,
    layer_scores: Tensor | None = None,
    batch_size: int = 4,
    progress: bool = False,
) -> DepthSelection:
    """Kept layers for depth `keep` (None: every depth 1..L) by `method`, each with its
    calibration perplexity on input_ids (N, S)."""
    L = model.config.num_hidden_layers
    if method not in METHODS:
        raise DataError(f"unknown depth-selection method {method!r}; choose one of {', '.join(METHODS)}")
    if keep is not None and not 1 <= keep <= L:
        raise DataError(f"keep={keep} is out of range; the model has {L} layers, so keep must be in 1..{L}")
    depths = [keep] if keep is not None else list(range(1, L + 1))
    evaluate = SubsetEvaluator(model, input_ids, batch_size, progress)
    started = time.perf_counter()
    if method == "bi":
        if layer_scores is None:
            layer_scores = torch.tensor(list(block_importance(model, input_ids, tuple(range(L)), batch_size).values()))
        order = torch.argsort(layer_scores, descending=True, stable=True).tolist()
        chosen = {k: tuple(sorted(order[:k])) for k in depths}
    elif method == "drop":
        chosen = _iterative_drop(model, input_ids, depths, batch_size)
    else:
        chosen = _dynamic_programme(L, depths, evaluate)
    perplexity = {k: evaluate(frozenset(layers)) for k, layers in chosen.items()}
    evaluate.bar.close()
    return DepthSelection(method, chosen, perplexity, len(evaluate.cache), time.perf_counter() - started)


def _iterative_drop(
    model: ElasticLlama, input_ids: Tensor, depths: list[int], batch_size: int
) -> dict[int, tuple[int, ...]]:
    kept = tuple(range(model.config.num_hidden_layers))
    chosen = {}
    while True:
        if len(kept) in depths:
            chosen[len(kept)] = kept
        if len(kept) <= min(depths):
            return chosen
        importance = block_importance(model, input_ids, kept, batch_size)
        weakest = min(kept, key=lambda i: (importance[i], -i))  # ties: drop the later layer
        kept = tuple(i for i in kept if i != weakest)


def _dynamic_programme(L: int, depths: list[int], evaluate: SubsetEvaluator) -> dict[int, tuple[int, ...]]:
    max_drops = L - min(depths)
    max_keep = max(depths)
    # best[k]: best kept set among the first n layers (n grows), judged with n..L-1 kept.
    best: dict[int, frozenset[int]] = {0: frozenset()}
    for n in range(1, L + 1):
        rest = frozenset(range(n, L))
        new: dict[int, frozenset[int]] = {}
        for k in range(max(0, n - max_drops), min(n, max_keep) + 1):
            options = []
            if k in best:  # layer n-1 dropped
                options.append(best[k])
            if k - 1 in best:  # layer n-1 kept
                options.append(best[k - 1] | {n - 1})
            options = [o for o in options if o | rest]  # keep at least one layer
            if options:
                # min over perplexity; on ties the later option (layer kept) wins
                new[k] = min(reversed(options), key=lambda o: evaluate(o | rest))
        best = new
    return {k: tuple(sorted(best[k])) for k in depths}
