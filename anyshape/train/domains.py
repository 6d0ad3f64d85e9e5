"""Dynamic batch loading (Sheared LLaMA, Algorithm 1): training data from several domains, mixed
by weights that move towards the domains whose held-out loss lags furthest behind a reference.

Every m steps the loop measures each domain's held-out loss (`held_out_losses`), compares it with
a reference loss per domain (`read_reference_losses`, or `reference_losses_from_model`), and calls
`DomainMixture.update`. The batches are a pure function of the seed, the batch index and the
weights history, which is the whole of `DomainMixture.state_dict()`, so a resumed run replays
exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import DataError
from anyshape.model.nll import mean_nll
from anyshape.shape import Shape
from anyshape.train.data import TrainingData, _local_files, build_training_data

INITIAL_WEIGHTS = ("tokens", "uniform")
SMOOTHING = 1e-4  # the share of the weights spread evenly after each update (Sheared LLaMA's code, after DoReMi)


def parse_domains(text: str) -> dict[str, str]:
    """{name: source} from 'name=source,name=source', in the order given. Sources are whatever
    `read_documents` reads; a local file or folder is checked now, a dataset name when it is read."""
    example = "e.g. --domains code=code.jsonl,web=web.txt"
    if not text.strip():
        raise DataError(f"no domains given; name each domain and its data, {example}")
    domains: dict[str, str] = {}
    for entry in text.split(","):
        name, equals, source = (part.strip() for part in entry.partition("="))
        if not equals:
            raise DataError(f"domain {entry.strip()!r} has no '='; write each domain as name=source, {example}")
        if not name or not source:
            raise DataError(f"domain {entry.strip()!r} has an empty name or source; write name=source, {example}")
        if name in domains:
            raise DataError(f"domain {name!r} is given twice; give each domain once, with all its data in one source")
        try:
            _local_files(source)
        except DataError as error:
            raise DataError(f"domain {name!r}: {error}") from None
        domains[name] = source
    return domains


def read_reference_losses(path: str | Path, domains: Iterable[str]) -> dict[str, float]:
    """{name: reference loss} (nats per token) from a JSON object that has one finite,
    non-negative number for each of `domains` and nothing else, in the order of `domains`."""
    names = list(domains)
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as error:
        raise DataError(
            f"reference losses {str(path)!r} are unreadable ({error}); "
            'pass a JSON object of loss per domain, e.g. {"code": 1.2, "web": 2.1}'
        ) from None
    if not isinstance(record, dict):
        raise DataError(
            f"reference losses {str(path)!r} hold a {type(record).__name__}, not a JSON object of name: loss"
        )
    missing, unknown = [n for n in names if n not in record], [n for n in record if n not in names]
    problems = [f"no loss for domain(s) {', '.join(missing)}"] if missing else []
    problems += [f"unknown domain(s) {', '.join(unknown)}"] if unknown else []
    if problems:
        raise DataError(
            f"reference losses {str(path)!r}: {'; '.join(problems)}; give one loss for each of {', '.join(names)}"
        )
    losses = {}
    for name in names:
        value = record[name]
        finite = (isinstance(value, float) and math.isfinite(value)) or (type(value) is int and value < 1e300)
        if not finite or value < 0:
            raise DataError(
                f"reference losses {str(path)!r}: domain {name!r} has {value!r}; "
                "a reference loss is a finite, non-negative number of nats per token"
            )
        losses[name] = float(value)
    return losses


def build_domain_data(
    tokenizer: PreTrainedTokenizerBase,
    domains: dict[str, str],
    sequence_length: int,
    cache_dir: str | Path,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> dict[str, TrainingData]:
    """{name: TrainingData}: each domain's source tokenized (cached), packed into sequences of
    `sequence_length` and split by `build_training_data`, with the same seed for every domain."""
    data = {}
    for name, source in domains.items():
        try:
            data[name] = build_training_data(
                tokenizer, source, sequence_length, cache_dir, val_fraction=val_fraction, seed=seed
            )
        except DataError as error:
            raise DataError(f"domain {name!r}: {error}") from None
    return data


class DomainMixture:
    """Batches mixed from several domains' training sequences by weights that `update` changes.

    Batch i has `batch_size` rows. Each row's domain is drawn from the weights in force at batch i
    (`torch.multinomial` with a generator seeded by (seed, i)); a domain's rows come in order from
    its own endless stream, whose epoch e is a permutation of the domain's sequences seeded by
    (seed, name, e), continuing where the rows of earlier batches left off. So `batch(i)` is a
    pure function of (seed, i, history): it may be called in any order and any number of times.

    Args:
        data: {name: TrainingData}, every domain's sequences of the same length S.
        batch_size: rows per batch.
        seed: fixes the draws of domains and each domain's order.
        initial: the weights before any update: "tokens", proportional to each domain's training
            tokens (the natural mixture of the data), or "uniform".
        eta: step size of the update, 1 in Sheared LLaMA.
        smoothing: after each update the weights become (1 - smoothing) w + smoothing / k over k
            domains, so no domain's weight falls to zero.
    """

    def __init__(
        self,
        data: dict[str, TrainingData],
        batch_size: int,
        seed: int,
        initial: str = "tokens",
        eta: float = 1.0,
        smoothing: float = SMOOTHING,
    ) -> None:
        if not data:
            raise DataError("a domain mixture needs at least one domain")
        lengths = {name: d.train.shape[-1] for name, d in data.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"every domain needs sequences of one length, got {lengths}; pack them with one --seq-len")
        if batch_size < 1:
            raise DataError(f"the batch size must be at least 1, got {batch_size}")
        if initial not in INITIAL_WEIGHTS:
            raise DataError(f"unknown initial weights {initial!r}; choose one of {', '.join(INITIAL_WEIGHTS)}")
        if not (math.isfinite(eta) and eta > 0):
            raise DataError(f"the step size eta must be a positive number, got {eta}")
        if not 0 <= smoothing < 1:
            raise DataError(f"the smoothing must be in [0, 1), got {smoothing}")
        self.data = data
        self.names = list(data)
        self.batch_size = batch_size
        self.seed = seed
        self.eta = eta
        self.smoothing = smoothing
        sizes = {name: len(d.train) if initial == "tokens" else 1 for name, d in data.items()}
        weights = {name: size / sum(sizes.values()) for name, size in sizes.items()}
        # history[u]: the weights in force from batch `batch` on, and the rows each domain gave before it
        self.history: list[dict[str, Any]] = [
            {"batch": 0, "weights": weights, "consumed": dict.fromkeys(self.names, 0)}
        ]
        self._cursor: tuple[int, int, dict[str, int]] = (0, 0, dict.fromkeys(self.names, 0))
        self._orders: dict[str, tuple[int, Tensor]] = {}

    @property
    def weights(self) -> dict[str, float]:
        """The current weights, summing to 1."""
        return dict(self.history[-1]["weights"])

    def batch(self, index: int) -> Tensor:
        """(batch_size, S) token ids of batch `index` (0-based), under the weights then in force."""
        if index < 0:
            raise DataError(f"batches count from 0, got {index}")
        anchor = max(u for u, entry in enumerate(self.history) if entry["batch"] <= index)
        consumed = self._consumed_before(anchor, index)
        domains = self._domains(anchor, index)  # (batch_size,)
        rows = torch.empty(self.batch_size, self.data[self.names[0]].train.shape[-1], dtype=torch.long)  # (b, S)
        after = dict(consumed)
        for position, name in enumerate(self.names):
            where = (domains == position).nonzero().squeeze(1)  # rows of this domain
            if len(where):
                rows[where] = self._rows(name, consumed[name], len(where))
            after[name] += len(where)
        self._cursor = (anchor, index + 1, after)
        return rows

    def update(self, losses: dict[str, float], reference: dict[str, float], batch: int) -> dict[str, float]:
        """Sheared LLaMA, Algorithm 1: w <- normalise(w * exp(eta * max(loss - ref, 0))), then
        smoothed (see the class); the new weights apply from batch index `batch` on (no earlier than
        the last update's). `losses` and `reference` are held-out losses per domain, nats per token.
        Returns the new weights, also appended to `history`."""
        for label, values in (("losses", losses), ("reference", reference)):
            if set(values) != set(self.names) or not all(math.isfinite(v) for v in values.values()):
                raise DataError(f"{label} {values} must hold one finite loss for each of {', '.join(self.names)}")
        last = self.history[-1]
        if batch < last["batch"]:
            raise DataError(f"the weights last changed at batch {last['batch']}; an update cannot apply from {batch}")
        excess = {name: self.eta * max(losses[name] - reference[name], 0.0) for name in self.names}
        top = max(excess.values())  # subtracted before exp: no overflow
        scaled = {name: last["weights"][name] * math.exp(excess[name] - top) for name in self.names}
        total = sum(scaled.values())
        share = self.smoothing / len(self.names)
        weights = {name: (1 - self.smoothing) * value / total + share for name, value in scaled.items()}
        consumed = self._consumed_before(len(self.history) - 1, batch)
        self.history.append({"batch": batch, "weights": weights, "consumed": consumed})
        return dict(weights)

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable record from which `load_state_dict` restores the same batches."""
        history = [{key: dict(v) if isinstance(v, dict) else v for key, v in e.items()} for e in self.history]
        return {"domains": list(self.names), "seed": self.seed, "batch_size": self.batch_size, "history": history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the weights history of `state_dict()`; the domains, seed and batch size must match."""
        mine = {"domains": self.names, "seed": self.seed, "batch_size": self.batch_size}
        theirs = {key: state.get(key) for key in mine}
        if theirs != mine:
            raise DataError(
                f"the saved domain mixture has {theirs}, this one {mine}; resume with the same --domains, "
                "seed and batch size"
            )
        self.history = [
            {"batch": e["batch"], "weights": dict(e["weights"]), "consumed": dict(e["consumed"])}
            for e in state["history"]
        ]
        self._cursor = (0, 0, dict(self.history[0]["consumed"]))

    def _consumed_before(self, anchor: int, index: int) -> dict[str, int]:
        """{name: rows} each domain gave to batches before `index`, counted from history[anchor]."""
        entry = self.history[anchor]
        cursor_anchor, start, consumed = self._cursor
        if cursor_anchor != anchor or not entry["batch"] <= start <= index:
            start, consumed = entry["batch"], entry["consumed"]
        consumed = dict(consumed)
        for step in range(start, index):
            counts = torch.bincount(self._domains(anchor, step), minlength=len(self.names))
            for name, count in zip(self.names, counts.tolist(), strict=True):
                consumed[name] += count
        self._cursor = (anchor, index, consumed)
        return dict(consumed)

    def _domains(self, anchor: int, index: int) -> Tensor:
        """(batch_size,) the domain (position in `names`) of each row of batch `index`."""
        weights = torch.tensor([self.history[anchor]["weights"][name] for name in self.names], dtype=torch.float64)
        generator = torch.Generator().manual_seed(_seed(self.seed, "domains", index))
        return torch.multinomial(weights, self.batch_size, replacement=True, generator=generator)

    def _rows(self, name: str, start: int, count: int) -> Tensor:
        """(count, S) positions [start, start + count) of the domain's stream of shuffled epochs."""
        sequences = self.data[name].train
        total = len(sequences)
        first, last = start // total, (start + count - 1) // total
        order = torch.cat([self._order(name, epoch) for epoch in range(first, last + 1)])
        offset = start - first * total
        return sequences[order[offset : offset + count]]

    def _order(self, name: str, epoch: int) -> Tensor:
        """(n,) the row order of the domain's epoch `epoch` (the latest one is kept)."""
        cached = self._orders.get(name)
        if cached is None or cached[0] != epoch:
            generator = torch.Generator().manual_seed(_seed(self.seed, name, epoch))
            cached = (epoch, torch.randperm(len(self.data[name].train), generator=generator))
            self._orders[name] = cached
        return cached[1]


@torch.no_grad()
def held_out_losses(
    model: nn.Module,
    mixture: DomainMixture,
    shape: Shape | None = None,
    batch_size: int = 4,
    max_sequences: int | None = None,
) -> dict[str, float]:
    """{name: mean next-token loss} (nats per token, `mean_nll`) of the model at `shape` on each
    domain's held-out sequences, the first `max_sequences` of them when given."""
    was_training = model.training
    model.eval()
    try:
        return {
            name: mean_nll(model, data.val[:max_sequences], shape, batch_size) for name, data in mixture.data.items()
        }
    finally:
        model.train(was_training)


def reference_losses_from_model(
    model: nn.Module, mixture: DomainMixture, batch_size: int = 4, max_sequences: int | None = None
) -> dict[str, float]:
    """{name: reference loss}: the held-out losses of a reference model (its full shape)."""
    return held_out_losses(model, mixture, None, batch_size, max_sequences)


def _seed(*parts: object) -> int:
    """A 63-bit generator seed from the parts' repr: distinct streams for distinct parts."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
