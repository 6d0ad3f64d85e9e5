"""Everything an elastic training run depends on, recorded in RUN/train.json."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyshape.errors import AnyshapeError, first_line
from anyshape.memory import parse_size
from anyshape.model.adapters import ADAPTERS
from anyshape.search.budget import check_basis, parse_anchors
from anyshape.search.space import DEFAULT_ALIGN, DEFAULT_FRACTIONS
from anyshape.train.distill import KD_LOSSES
from anyshape.train.sampling import SAMPLING

RUN_FILE = "train.json"  # marks a folder `anyshape train` wrote: its settings, with the parent model
PRECISIONS = ("auto", "fp32", "bf16")
NONFINITE = ("skip", "stop")  # what a step whose loss or gradient is NaN or inf does
SEEDS = (-(2**63), 2**64)  # the seeds torch.manual_seed takes
# may change when a run resumes (or moves)
RESUMABLE = ("out", "save_every", "eval_every", "log_every", "on_nonfinite", "max_memory")


@dataclass(frozen=True)
class TrainSettings:
    """Options of `anyshape train`; the field names are the config file's keys."""

    model: str = "smollm2-135m"
    data: str | None = None  # file, folder or cached datasets name; None: the embedded default text
    val_data: str | None = None  # None: a held-out share (val_fraction) of data
    out: str = "run"
    sampling: str = "sandwich"
    random_shapes: int = 2  # sandwich: random Shapes per step; grid: parameter bins
    shapes: tuple[dict[str, Any], ...] = ()  # sampling fixed: the Shapes (as JSON dicts)
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    align: int = DEFAULT_ALIGN
    kd: str = "cosine"  # a KD loss, or "none": every Shape learns the next token
    balance_losses: bool = False
    teacher: str = "largest"  # KD from the largest Shape in place, "parent" (frozen), or a MODEL of the same vocabulary
    adapter: str = "full"
    all_weights: bool = False  # full: train every weight, also those a compact shared model keeps frozen
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: 2 x rank
    experts: int = 4  # smol: LoRA experts per projection
    top_k: int = 1  # smol: experts per Shape
    steps: int = 200
    seq_len: int = 256
    batch_size: int = 4  # sequences per optimizer step, over all processes and accumulation
    grad_accum: int = 1
    lr: float | None = None  # None: 1e-4 full fine-tuning, 1e-3 adapters
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0: no clipping
    on_nonfinite: str = "skip"  # a NaN or inf loss or gradient: skip the step (logged), or stop the run
    max_memory: str | None = None  # refuse a run whose estimated peak exceeds this ("8GiB"); None: what is free
    precision: str = "auto"  # auto: bf16 autocast on a CUDA device that has it, else fp32
    distributed: str = "ddp"  # under torchrun: ddp, or fsdp (sharded per decoder layer)
    val_fraction: float = 0.05
    val_batches: int = 4
    save_every: int = 50
    eval_every: int = 50
    log_every: int = 1
    seed: int = 0
    router: bool = False  # students: the Shapes a learned budget router samples at each anchor
    anchors: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # router: budgets it trains at
    budget_basis: str = "total"  # router: budgets count total or non-embedding parameters
    budget_weight: float = 100.0  # router: weight of the over-budget penalty
    router_lr: float = 0.003  # Adam moves every weight by about this per step: 0.05 collapsed the anchors
    tau_start: float = 1.0  # router: Gumbel-softmax temperature, annealed exponentially
    tau_end: float = 0.1
    router_only: bool = False  # router: train the router alone, the model frozen
    modulation: bool = False  # Shape-conditioned output scales on o_proj and down_proj
    prune_target: dict[str, int] | None = None  # targeted pruning (Sheared LLaMA) to these sizes
    mask_lr: float = 0.1  # pruning: the masks' learning rate
    lambda_lr: float = 0.1  # pruning: the Lagrange multipliers' (gradient ascent)
    target_warmup_steps: int = 0  # pruning: steps over which the target moves from the parent to its sizes
    domains: str | None = None  # instead of data: 'name=source,...', batches mixed by domain weights
    dynamic_batch: bool = False  # domains: reweight them by held-out loss over reference (Sheared LLaMA)
    reference_losses: str | None = None  # dynamic_batch: a JSON file {domain: loss in nats per token}
    reference_model: str | None = None  # dynamic_batch: ... or the model whose held-out losses they are
    domain_update_every: int = 20  # dynamic_batch: steps between reweightings

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.adapter == "full" else 1e-3)

    def check(self) -> TrainSettings:
        """Returns self, or raises AnyshapeError naming the bad setting and its allowed values."""
        for name, value, allowed in (
            ("sampling", self.sampling, SAMPLING),
            ("kd", self.kd, (*KD_LOSSES, "none")),
            ("adapter", self.adapter, ADAPTERS),
            ("precision", self.precision, PRECISIONS),
            ("distributed", self.distributed, ("ddp", "fsdp")),
            ("on_nonfinite", self.on_nonfinite, NONFINITE),
        ):
            if value not in allowed:
                raise AnyshapeError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        for name, least in (
            *((name, 1) for name in ("steps", "seq_len", "batch_size", "grad_accum", "save_every", "eval_every")),
            *((name, 1) for name in ("log_every", "lora_rank", "experts", "top_k", "val_batches", "align")),
            *((name, 0) for name in ("random_shapes", "warmup_steps", "target_warmup_steps", "weight_decay")),
            *((name, 0) for name in ("max_grad_norm", "budget_weight", "router_lr", "mask_lr", "lambda_lr")),
        ):
            if getattr(self, name) < least:
                raise AnyshapeError(f"{name}={getattr(self, name)} must be at least {least}")
        if self.lr is not None and self.lr < 0:
            raise AnyshapeError(f"lr={self.lr} must be at least 0")
        if not SEEDS[0] <= self.seed < SEEDS[1]:
            raise AnyshapeError(f"seed={self.seed} is out of range; use an integer in 0..{SEEDS[1] - 1}")
        if not self.fractions or not all(0 < value <= 1 for value in self.fractions):
            raise AnyshapeError(f"fractions {list(self.fractions)} must each be in (0, 1], e.g. 0.25,0.5,0.75,1")
        if self.max_memory is not None:
            parse_size(self.max_memory)
        if not self.teacher.strip():
            raise AnyshapeError(
                "teacher is empty; give largest (in-place distillation), parent (the parent model, frozen) or a MODEL"
            )
        if self.seq_len < 2:
            raise AnyshapeError(f"seq_len={self.seq_len} must be at least 2 (one token predicts the next)")
        if self.batch_size % self.grad_accum:
            raise AnyshapeError(
                f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum} "
                "(each accumulation step takes batch_size / grad_accum sequences)"
            )
        if not 0 < self.val_fraction < 1:
            raise AnyshapeError(f"val_fraction={self.val_fraction} must be in (0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise AnyshapeError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        parse_anchors(self.anchors)
        check_basis(self.budget_basis)
        if not (self.tau_start > 0 and self.tau_end > 0):
            raise AnyshapeError(f"tau_start={self.tau_start} and tau_end={self.tau_end} must be positive")
        if self.domains is not None and self.data is not None:
            raise AnyshapeError("give the training text either as --data or as --domains, not both")
        if self.dynamic_batch and self.domains is None:
            raise AnyshapeError("--dynamic-batch reweights domains: give them with --domains name=source,...")
        if self.dynamic_batch and (self.reference_losses is None) == (self.reference_model is None):
            raise AnyshapeError(
                "--dynamic-batch compares each domain's loss with a reference: give exactly one of "
                "--reference-losses ref.json and --reference-model MODEL"
            )
        if self.domain_update_every < 1:
            raise AnyshapeError(f"domain_update_every={self.domain_update_every} must be at least 1")
        if self.router and self.prune_target is not None:
            raise AnyshapeError("a run either learns a budget router or prunes to a target, not both")
        if self.router_only and not self.router:
            raise AnyshapeError("router_only trains the router alone: pass --router too")
        if self.router_only and self.adapter != "full":
            raise AnyshapeError(
                f"router_only keeps the model frozen, so --adapter {self.adapter} would never train; "
                "drop one of the two"
            )
        if self.all_weights and (self.adapter != "full" or self.router_only):
            raise AnyshapeError("all_weights trains every weight: use it with --adapter full and without --router-only")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any], source: str) -> TrainSettings:
        """Settings from a config file's or train.json's mapping; unknown keys are refused."""
        if not isinstance(record, dict):
            raise AnyshapeError(f"{source} must hold a mapping of settings, e.g. 'steps: 200', not {record!r:.40}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(record) - names))
        if unknown:
            raise AnyshapeError(f"{source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values = dict(record)
        for name, value in values.items():
            kind, accepts = _KINDS[_TYPES[name].removesuffix(" | None")]
            if not (accepts(value) or (value is None and _TYPES[name].endswith(" | None"))):
                raise AnyshapeError(f"{source}: setting {name}={value!r} must be {kind}")
        for name in ("shapes", "fractions", "anchors"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def differences(self, other: TrainSettings) -> list[str]:
        """'name: mine vs other' for every setting that differs, besides the resumable ones."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if k not in RESUMABLE and mine[k] != theirs[k]]


def _number(value: Any) -> bool:
    return type(value) is int or (isinstance(value, float) and math.isfinite(value))


_TYPES = {field.name: field.type for field in dataclasses.fields(TrainSettings)}  # annotations, as text
_KINDS = {  # annotation (without "| None"): what a config file must give, and its test
    "str": ("text", lambda value: isinstance(value, str)),
    "int": ("an integer", lambda value: type(value) is int),
    "float": ("a finite number", _number),
    "bool": ("true or false", lambda value: isinstance(value, bool)),
    "tuple[float, ...]": (
        "a list of numbers",
        lambda value: isinstance(value, list | tuple) and all(map(_number, value)),
    ),
    "tuple[dict[str, Any], ...]": (
        "a list of Shapes (mappings such as {hidden_size: 288})",
        lambda value: isinstance(value, list | tuple) and all(isinstance(shape, dict) for shape in value),
    ),
    "dict[str, int]": ("a mapping of sizes", lambda value: isinstance(value, dict)),
}


def read_settings(run: Path) -> TrainSettings:
    """The settings a run was started with (RUN/train.json)."""
    path = Path(run) / RUN_FILE
    if not path.is_file():
        raise AnyshapeError(f"{run} is not a run folder (no {RUN_FILE}); pass the --out of an earlier anyshape train")
    try:
        record = json.loads(path.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise AnyshapeError(f"{path} is unreadable ({first_line(error)}); the run folder is damaged") from None
    return TrainSettings.from_dict(record, str(path))
