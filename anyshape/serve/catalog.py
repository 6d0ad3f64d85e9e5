"""What a served model offers: its sizes by name, a Shape for any budget, and the largest size
whose decoding fits a latency.

    NAME            the largest size (the whole model)
    NAME@B          a size for budget B, a fraction of the parent's parameters: a named size
                    where one has that budget, else the Shape the model's own way of sizing picks
                    (a compress family's elastic/ model: the family's search on its weights;
                    a `train --router` run: its router); a plain model has only its own size

The named sizes are the whole model and a family's members (or a router's anchors). Each one's
decode latency is measured when the catalog is made: one token after a short prompt, at batch 1.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from anyshape.checkpoints import load_tokenizer
from anyshape.compress.elastic import ElasticRecord, search_elastic
from anyshape.data.calibration import calibration_ids
from anyshape.data.text import load_text
from anyshape.deploy.speed import FAMILY_SUMMARY
from anyshape.errors import AnyshapeError
from anyshape.model.llama import ElasticLlama, KVCache
from anyshape.router.control import load_router
from anyshape.search.budget import Budget, check_fraction
from anyshape.shape import Shape
from anyshape.train.settings import RUN_FILE, read_settings

SEARCH_SEQUENCES, SEARCH_LENGTH = 8, 256  # the search's calibration windows, as compress's
LATENCY_PROMPT, LATENCY_TOKENS = 32, 8  # tokens of the timed prompt, and decode steps timed after it


@dataclass(frozen=True)
class Size:
    """A named Shape of the served model and its measured decode latency (ms per token, batch 1)."""

    name: str
    shape: Shape
    budget: float  # fraction of the parent's parameters (on the model's budget basis)
    decode_ms: float


class Catalog:
    """The sizes a server offers by name, and the Shape for any budget."""

    def __init__(
        self,
        name: str,
        model: ElasticLlama,
        shapes: dict[float, Shape],
        basis: str = "total",
        budget_shape: Callable[[Budget], Shape] | None = None,
    ):
        """`shapes`: the named sizes by budget; `budget_shape`: the Shape for any other budget
        (None: only the named sizes are served)."""
        if "@" in name or not name.strip():
            raise AnyshapeError(f"the served model's name {name!r} must be non-empty and without '@'")
        self.name, self.model, self.basis = name, model, basis
        self._budget_shape = budget_shape
        self._found: dict[float, Shape] = {}
        self._finding = threading.Lock()
        self.sizes = [
            Size(f"{name}@{budget:g}", shape, budget, decode_latency_ms(model, shape))
            for budget, shape in sorted(shapes.items(), reverse=True)
        ]

    @property
    def names(self) -> list[str]:
        return [self.name] + [size.name for size in self.sizes]

    @property
    def largest(self) -> Size:
        return self.sizes[0]

    def resolve(
        self, model: str, budget: float | None = None, max_latency_ms: float | None = None
    ) -> tuple[str, Shape]:
        """The (name, Shape) a request asks for: by `model` (NAME or NAME@B), and at most one of
        a `budget` or a `max_latency_ms` (the largest named size whose decode latency fits)."""
        base, _, suffix = model.partition("@")
        if base != self.name:
            raise AnyshapeError(f"unknown model {model!r}; this server offers {', '.join(self.names)}")
        if suffix and (budget is not None or max_latency_ms is not None):
            raise AnyshapeError(f"{model!r} names its size already; leave out budget and max_latency_ms")
        if budget is not None and max_latency_ms is not None:
            raise AnyshapeError("give a budget or a max_latency_ms, not both")
        if suffix:
            try:
                budget = float(suffix)
            except ValueError:
                raise AnyshapeError(f"unknown model {model!r}; after '@' comes a budget such as 0.5") from None
        if max_latency_ms is not None:
            fitting = [size for size in self.sizes if size.decode_ms <= max_latency_ms]
            if not fitting:
                fastest = min(self.sizes, key=lambda size: size.decode_ms)
                raise AnyshapeError(
                    f"no size decodes within {max_latency_ms:g} ms per token; the fastest, {fastest.name}, "
                    f"takes {fastest.decode_ms:.1f} ms"
                )
            return fitting[0].name, fitting[0].shape
        if budget is None:
            return self.name, self.largest.shape
        return f"{self.name}@{budget:g}", self.budget_shape(budget)

    def budget_shape(self, fraction: float) -> Shape:
        """The Shape for a budget of `fraction`: a named size's, else found once and kept."""
        check_fraction(fraction)
        for size in self.sizes:
            if abs(size.budget - fraction) < 1e-9:
                return size.shape
        if self._budget_shape is None:
            raise AnyshapeError(
                f"this model serves only {', '.join(self.names)}; serve a compress family's elastic/ model or "
                "a `train --router` run for any budget"
            )
        with self._finding:
            if fraction not in self._found:
                self._found[fraction] = self._budget_shape(Budget(fraction, self.basis))
            return self._found[fraction]


def catalog_of(folder: str | Path, model: ElasticLlama, name: str) -> Catalog:
    """The catalog of the model `folder` (loaded as `model`): a compress family's elastic/
    model, a `train --router` run, or any other model (its own size only)."""
    folder = Path(str(folder))
    full = Shape.full(model.config)
    record = ElasticRecord.read(folder) if folder.is_dir() else None
    if record is not None:
        members = member_shapes(folder.parent / FAMILY_SUMMARY, model)
        windows = calibration_ids(load_tokenizer(folder), load_text(None), SEARCH_SEQUENCES, SEARCH_LENGTH, 0)

        def searched(budget: Budget) -> Shape:
            return search_elastic(model, folder, record, budget, windows).shape

        return Catalog(name, model, {1.0: full, **members}, record.budget_basis, searched)
    if (folder / RUN_FILE).is_file() and read_settings(folder).router:
        router = load_router(folder)
        anchors = {anchor: router.route(Budget(anchor, router.basis)).shape for anchor in router.anchors.tolist()}
        return Catalog(
            name, model, {1.0: full, **anchors}, router.basis, lambda budget: router.route(budget).shape
        )  # fmt: skip
    return Catalog(name, model, {1.0: full})


def member_shapes(summary: Path, model: ElasticLlama) -> dict[float, Shape]:
    """Budget -> Shape of each member a family's summary.json lists (none if there is no summary)."""
    if not summary.is_file():
        return {}
    try:
        members = json.loads(summary.read_text())["members"]
        return {float(m["budget"]): Shape.from_dict(m["shape"], model.config) for m in members}
    except (ValueError, KeyError, TypeError) as error:
        raise AnyshapeError(f"{summary} does not list the family's members ({type(error).__name__}: {error})") from None


@torch.inference_mode()
def decode_latency_ms(model: ElasticLlama, shape: Shape) -> float:
    """Median milliseconds of one decode step of `shape` at batch 1, after a short prompt."""
    device = model.inv_freq.device
    cache = KVCache(shape)
    model.hidden_states(torch.zeros(1, LATENCY_PROMPT, dtype=torch.long, device=device), shape, cache)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    seconds = []
    for _ in range(LATENCY_TOKENS):
        started = time.perf_counter()
        model.lm_head_logits(model.hidden_states(token, shape, cache)[:, -1], shape)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return 1000 * statistics.median(seconds)
