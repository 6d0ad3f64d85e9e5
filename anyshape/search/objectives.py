"""What a search minimises: costs of a Shape (parameters, FLOPs, measured latency) and its
quality loss (calibration perplexity, or KD loss against the full model).

Cost names:
    params                parameters of the exported model
    params_non_embedding  without the embedding and LM head matrices
    flops                 forward FLOPs per token at a 512-token context
    latency               decode step, ms: one token at batch 1, measured on the device
    prefill               prefill of `prompt_tokens` tokens at batch 1, ms, measured
Quality names:
    ppl                   perplexity on calibration sequences (every position after the first)
    kd                    mean forward KL(full model || Shape) per token, nats
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from anyshape.errors import DataError
from anyshape.files import atomic_write_text
from anyshape.model.llama import ElasticLlama
from anyshape.model.nll import mean_nll
from anyshape.shape import Shape

COSTS = ("params", "params_non_embedding", "flops", "latency", "prefill")
QUALITIES = ("ppl", "kd")


def cost_functions(model: ElasticLlama, latency: LatencyTable | None = None) -> dict[str, Callable[[Shape], float]]:
    """Every cost by name; `latency` and `prefill` only when a latency table is given."""
    config = model.config
    costs: dict[str, Callable[[Shape], float]] = {
        "params": lambda shape: float(shape.num_parameters(config)),
        "params_non_embedding": lambda shape: float(shape.num_parameters(config, embeddings=False)),
        "flops": lambda shape: float(shape.flops_per_token(config)),
    }
    if latency is not None:
        costs["latency"] = lambda shape: latency.measure(model, shape)["decode_ms"]
        costs["prefill"] = lambda shape: latency.measure(model, shape)["prefill_ms"]
    return costs


class Quality:
    """Quality loss of a Shape on calibration input_ids (N, S), lower is better, memoised.

    `kd` keeps the full model's log-probabilities of every calibration token in memory
    (N x S x V floats), so use it with a small proxy set on large vocabularies.
    """

    def __init__(self, model: ElasticLlama, input_ids: Tensor, metric: str = "ppl", batch_size: int = 4):
        if metric not in QUALITIES:
            raise DataError(f"unknown quality objective {metric!r}; choose one of {', '.join(QUALITIES)}")
        self.model, self.input_ids, self.metric, self.batch_size = model, input_ids, metric, batch_size
        self.cache: dict[Shape, float] = {}
        self.teacher: list[Tensor] = []
        if metric == "kd":
            with torch.no_grad():
                self.teacher = [F.log_softmax(model(batch).float(), dim=-1) for batch in self._batches()]

    def __call__(self, shape: Shape) -> float:
        if shape not in self.cache:
            self.cache[shape] = self._ppl(shape) if self.metric == "ppl" else self._kd(shape)
        return self.cache[shape]

    def _batches(self) -> list[Tensor]:
        return list(self.input_ids.split(self.batch_size))

    def _ppl(self, shape: Shape) -> float:
        return math.exp(mean_nll(self.model, self.input_ids, shape, self.batch_size))

    @torch.no_grad()
    def _kd(self, shape: Shape) -> float:
        total, count = 0.0, 0
        for batch, teacher in zip(self._batches(), self.teacher, strict=True):
            student = F.log_softmax(self.model(batch, shape).float(), dim=-1)  # (B, S, V)
            total += F.kl_div(student, teacher, log_target=True, reduction="sum").item()
            count += batch.numel()
        return total / count


class LatencyTable:
    """Measured batch-1 latency per distinct Shape on one device, kept in a JSON file so later
    searches reuse it. Entries are keyed by the model, the device, the prompt length and the
    Shape; a table from another setting simply has no matching entries.

    prefill_ms  one forward over `prompt_tokens` tokens
    decode_ms   one forward of a single token: the weight-bound cost of a decode step
                (without the attention over a KV cache, which grows with the context)
    Each is the median of `repeats` timed runs after one warm-up run.
    """

    def __init__(
        self, path: str | Path | None, model_id: str, device: str = "cpu", prompt_tokens: int = 128, repeats: int = 5
    ):
        self.path = Path(path) if path is not None else None
        self.model_id, self.device, self.prompt_tokens, self.repeats = model_id, device, prompt_tokens, repeats
        self.entries: dict[str, dict[str, float]] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataError(f"latency table {self.path} is not valid JSON; delete it to start a new one") from None

    def key(self, shape: Shape) -> str:
        return f"{self.model_id}|{self.device}|{self.prompt_tokens}|{shape.to_json()}"

    def measure(self, model: ElasticLlama, shape: Shape) -> dict[str, float]:
        """{'prefill_ms', 'decode_ms'} of `shape`, from the table or measured now (and saved)."""
        key = self.key(shape)
        if key not in self.entries:
            device = torch.device(self.device)
            prompt = torch.zeros(1, self.prompt_tokens, dtype=torch.long, device=device)
            token = prompt[:, :1]
            self.entries[key] = {
                "prefill_ms": _median_ms(lambda: model(prompt, shape), self.repeats, device),
                "decode_ms": _median_ms(lambda: model(token, shape), self.repeats, device),
            }
            self.save()
        return self.entries[key]

    def save(self) -> None:
        if self.path is None:
            return
        atomic_write_text(self.path, json.dumps(self.entries, indent=1))


@torch.inference_mode()
def _median_ms(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run()  # warm-up
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run()
        synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)
