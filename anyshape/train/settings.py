"""Everything an elastic training run depends on, recorded in RUN/train.json."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anyshape.errors import AnyshapeError, first_line
from anyshape.memory import parse_size
from anyshape.model.adapters import ADAPTERS
from anyshape.search.budget import check_basis, parse_anchors
from anyshape.search.space import DEFAULT_ALIGN, DEFAULT_FRACTIONS, parse_fractions
from anyshape.train.distill import KD_LOSSES
from anyshape.train.sampling import SAMPLING

TEACHER_KEYWORDS = ("largest", "parent")  # teachers named by role, not by a MODEL path
RUN_FILE = "train.json"  # marks a folder `anyshape train` wrote: its settings, with the parent model
PRECISIONS = ("auto", "fp32", "bf16")
NONFINITE = ("skip", "stop")  # what a step whose loss or gradient is NaN or inf does
SEEDS = (-(2**63), 2**64)  # the seeds torch.manual_seed takes
# may change when a run resumes (or moves)
RESUMABLE = ("out", "save_every", "eval_every", "log_every", "on_nonfinite", "max_memory", "compile")


ROUTER_PANEL = "Budget router (LLaMaFlex)"
PRUNING_PANEL = "Targeted pruning (Sheared LLaMA, anyshape prune)"
DOMAINS_PANEL = "Domains and dynamic batch loading (Sheared LLaMA)"


def read_shapes(text: str) -> tuple[dict[str, Any], ...]:
    """Shapes from a JSON list (or one object), inline or in a file."""
    inline = text.lstrip().startswith(("{", "["))
    try:
        shapes = json.loads(text if inline or not Path(text).is_file() else Path(text).read_text())
    except (OSError, ValueError, RecursionError):
        raise AnyshapeError(
            f"{text!r} is neither a JSON file nor inline JSON; write a list of Shapes, e.g. "
            '\'[{"hidden_size": 288}, {"num_hidden_layers": 20}]\''
        ) from None
    shapes = shapes if isinstance(shapes, list) else [shapes]
    if not all(isinstance(shape, dict) for shape in shapes):
        raise AnyshapeError("each Shape must be a JSON object")
    return tuple(shapes)


@dataclass(frozen=True)
class About:
    """What a setting means (its option's help, and the config key's), and how the command line shows it."""

    help: str
    min: float | None = None  # the least value, refused below it (command line and config file alike)
    max: float | None = None
    metavar: str | None = None
    panel: str | None = None  # the help panel of its option
    parse: Callable[[str], Any] | None = None  # the option's text -> the value (fractions, anchors, Shapes)
    argument: bool = False  # a positional argument, not an --option
    option: bool = True  # False: no command-line option (set by another command, or by a config file)


def setting(default: Any, help: str, **about: Any) -> Any:
    """A TrainSettings field: its default and what it is (About: help text, least value, CLI details)."""
    return dataclasses.field(default=default, metadata={"about": About(help, **about)})


def about(field: dataclasses.Field) -> About:
    return field.metadata["about"]


@dataclass(frozen=True)
class TrainSettings:
    """Options of `anyshape train`; the field names are the config file's keys."""

    model: str = setting(
        "smollm2-135m",
        "Parent: Hugging Face folder (ideally sorted by `anyshape sort`), .gguf file, or 'smollm2-135m'.",
        metavar="MODEL",
        argument=True,
    )
    data: str | None = setting(
        None,
        "Training text: .txt, .jsonl ('text'), .parquet ('text'), a folder of those, or a datasets name "
        "in the local cache. Default: the embedded text.",
        metavar="SOURCE",
    )
    val_data: str | None = setting(
        None, "Held-out text, as --data. Default: --val-fraction of --data.", metavar="SOURCE"
    )
    out: str = setting("run", "Run folder: settings, checkpoint, metrics.jsonl.")
    sampling: str = setting(
        "sandwich",
        "Shapes per step: sandwich (largest, smallest, --random-shapes random), grid (largest and one per "
        "parameter bin), fixed (largest and --shapes), largest (it alone); --shapes join sandwich and grid too.",
    )
    random_shapes: int = setting(2, "sandwich: random Shapes per step; grid: parameter bins.", min=0)
    shapes: tuple[dict[str, Any], ...] = setting(
        (), "Shapes trained on every step: a JSON list, inline or a file.", metavar="SHAPES", parse=read_shapes
    )
    fractions: tuple[float, ...] = setting(
        DEFAULT_FRACTIONS, "Grid of sizes per axis, as fractions of the parent.", parse=parse_fractions
    )
    align: int = setting(
        DEFAULT_ALIGN,
        "Hidden and MLP sizes are multiples of this (32: llama.cpp's quantisation block; 1: any size).",
        min=1,
    )
    kd: str = setting("cosine", "Distillation from the largest Shape: forward-kl, reverse-kl, js, cosine, l2, or none.")
    balance_losses: bool = setting(False, "Scale each Shape's loss to the largest's running magnitude (AmoebaLLM).")
    teacher: str = setting(
        "largest",
        "Whom every Shape distils from: largest (the largest Shape, in place), parent (MODEL as loaded, frozen), "
        "or any MODEL of the same vocabulary (frozen).",
        metavar="TEACHER",
    )
    adapter: str = setting(
        "full", "full (every weight), lora, or smol (Shape-gated LoRA experts); base frozen with adapters."
    )
    all_weights: bool = setting(
        False,
        "With --adapter full, train every weight, also those the model keeps frozen (a compact model of "
        "anyshape share: its stored weights, not only its recovery).",
    )
    lora_rank: int = setting(16, "LoRA rank.", min=1)
    lora_alpha: float | None = setting(None, "LoRA alpha. Default: 2 x rank.")
    experts: int = setting(4, "smol: LoRA experts per projection.", min=1)
    top_k: int = setting(1, "smol: experts each Shape uses.", min=1)
    steps: int = setting(200, "Optimizer steps.", min=1)
    seq_len: int = setting(256, "Tokens per training sequence.", min=2)
    batch_size: int = setting(4, "Sequences per optimizer step, over all processes and accumulation.", min=1)
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", min=1)
    lr: float | None = setting(None, "Peak learning rate. Default: 1e-4 full, 1e-3 adapters.", min=0)
    weight_decay: float = setting(0.0, "AdamW weight decay.", min=0)
    warmup_steps: int = setting(10, "Linear warmup steps, then cosine.", min=0)
    min_lr_ratio: float = setting(0.1, "Final learning rate / peak.")
    max_grad_norm: float = setting(1.0, "Gradient clipping norm (0: none).", min=0)
    on_nonfinite: str = setting(
        "skip",
        "A step whose loss or gradient is NaN or inf: skip it (logged, not applied) or stop the run "
        "with an error naming the step (after a checkpoint of the steps before it).",
    )
    max_memory: str | None = setting(
        None,
        "Refuse to start training when the estimated peak memory of a step exceeds this (e.g. 8GiB); "
        "default: what the loaded model holds plus what is free.",
        metavar="SIZE",
    )
    precision: str = setting("auto", "auto (bf16 autocast on a CUDA GPU that has it, else fp32), fp32 or bf16.")
    activation_checkpointing: bool = setting(
        False,
        "Keep only each decoder layer's input and recompute the layer in the backward pass: a fraction of the "
        "activation memory, for about a third more compute.",
    )
    compile: bool = setting(
        False,
        "torch.compile each decoder layer, its sizes dynamic: one graph serves every width, so changing Shapes do "
        "not recompile each step. The first steps are slower while it compiles.",
    )
    distributed: str = setting("ddp", "Under torchrun: ddp, or fsdp (sharded per decoder layer).")
    val_fraction: float = setting(0.05, "Held-out share of --data without --val-data.")
    val_batches: int = setting(4, "Held-out batches per evaluation.", min=1)
    save_every: int = setting(50, "Checkpoint every N steps (and at the end).", min=1)
    eval_every: int = setting(50, "Held-out perplexity every N steps.", min=1)
    log_every: int = setting(1, "Write metrics every N steps.", min=1)
    seed: int = setting(0, "Seed of data order, Shape sampling and adapter init.")
    router: bool = setting(
        False,
        "Learn a budget router: the students are the Shapes it samples at each --anchors budget.",
        panel=ROUTER_PANEL,
    )
    anchors: tuple[float, ...] = setting(
        (0.25, 0.5, 0.75, 1.0),
        "Budgets the router trains at, fractions of the parent's parameters.",
        panel=ROUTER_PANEL,
        parse=parse_anchors,
    )
    budget_basis: str = setting("total", "Budgets count total or non-embedding parameters.", panel=ROUTER_PANEL)
    budget_weight: float = setting(100.0, "Weight of the over-budget penalty.", min=0, panel=ROUTER_PANEL)
    # Adam moves every weight by about router_lr per step: 0.05 collapsed the anchors
    router_lr: float = setting(0.003, "The router's learning rate.", min=0, panel=ROUTER_PANEL)
    tau_start: float = setting(1.0, "Gumbel-softmax temperature at the start.", panel=ROUTER_PANEL)
    tau_end: float = setting(0.1, "... annealed exponentially to this at the end.", panel=ROUTER_PANEL)
    router_only: bool = setting(
        False,
        "Train the router alone, the model frozen (with --modulation: and the modulation).",
        panel=ROUTER_PANEL,
    )
    modulation: bool = setting(
        False,
        "Shape-conditioned output scales after every attention and MLP block, folded in at export.",
        panel=ROUTER_PANEL,
    )
    prune_target: dict[str, int] | None = setting(
        None,
        "Targeted pruning (Sheared LLaMA) to these sizes; set by `anyshape prune --target`.",
        panel=PRUNING_PANEL,
        option=False,
    )
    mask_lr: float = setting(0.1, "Pruning: the masks' learning rate.", min=0, panel=PRUNING_PANEL)
    lambda_lr: float = setting(0.1, "Pruning: the Lagrange multipliers' (gradient ascent).", min=0, panel=PRUNING_PANEL)
    target_warmup_steps: int = setting(
        0, "Pruning: steps over which the target moves from the parent's sizes to its own.", min=0, panel=PRUNING_PANEL
    )
    domains: str | None = setting(
        None,
        "Instead of --data: several domains, 'name=source,...', each batch mixed by domain weights "
        "(initially their token shares).",
        metavar="DOMAINS",
        panel=DOMAINS_PANEL,
    )
    dynamic_batch: bool = setting(
        False,
        "Every --domain-update-every steps, up-weight the domains whose held-out loss is furthest above "
        "its reference: w <- normalise(w * exp(max(loss - ref, 0))).",
        panel=DOMAINS_PANEL,
    )
    reference_losses: str | None = setting(
        None,
        "--dynamic-batch: a JSON file {domain: reference loss, nats per token}.",
        metavar="FILE",
        panel=DOMAINS_PANEL,
    )
    reference_model: str | None = setting(
        None,
        "--dynamic-batch: ... or a model whose held-out losses are the references.",
        metavar="MODEL",
        panel=DOMAINS_PANEL,
    )
    domain_update_every: int = setting(20, "--dynamic-batch: steps between reweightings.", min=1, panel=DOMAINS_PANEL)

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
        if self.seq_len < 2:
            raise AnyshapeError(f"seq_len={self.seq_len} must be at least 2 (one token predicts the next)")
        for field in dataclasses.fields(self):
            value, meaning = getattr(self, field.name), about(field)
            if meaning.min is not None and value is not None and value < meaning.min:
                raise AnyshapeError(f"{field.name}={value} must be at least {meaning.min}")
            if meaning.max is not None and value is not None and value > meaning.max:
                raise AnyshapeError(f"{field.name}={value} must be at most {meaning.max}")
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

    def with_absolute_paths(self) -> TrainSettings:
        """Local paths made absolute, so the run folder works from any directory."""

        def absolute(value: str | None) -> str | None:
            try:
                return str(Path(value).expanduser().resolve()) if Path(value).expanduser().exists() else value
            except (TypeError, OSError):  # None, or not a usable path (e.g. a dataset name, or too long for one)
                return value

        domains = self.domains
        if domains is not None:
            domains = ",".join(
                f"{name.strip()}={absolute(source.strip())}" if sep else entry
                for entry in domains.split(",")
                for name, sep, source in [entry.partition("=")]
            )
        return dataclasses.replace(
            self, model=absolute(self.model), data=absolute(self.data), val_data=absolute(self.val_data),
            domains=domains, reference_losses=absolute(self.reference_losses),
            reference_model=absolute(self.reference_model),
            teacher=self.teacher if self.teacher in TEACHER_KEYWORDS else absolute(self.teacher),
        )  # fmt: skip

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


def read_config(path: Path) -> dict[str, Any]:
    """A config file's settings (a YAML or JSON mapping, keys as TrainSettings' fields); `shapes`
    may name a JSON file."""
    import yaml

    if not path.is_file():
        raise AnyshapeError(f"config file {str(path)!r} not found; pass a YAML file of settings, e.g. 'steps: 200'")
    try:
        record = yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise AnyshapeError(f"{path} is not UTF-8 text; write the settings as YAML") from None
    except RecursionError:
        raise AnyshapeError(f"{path} is nested too deeply; write a mapping of settings, e.g. 'steps: 200'") from None
    except yaml.YAMLError as error:
        raise AnyshapeError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(record, dict):
        raise AnyshapeError(f"{path} must hold a mapping of settings, e.g. 'steps: 200'")
    if isinstance(record.get("shapes"), str):
        record["shapes"] = read_shapes(record["shapes"])
    TrainSettings.from_dict(record, str(path))  # unknown keys are named with the file
    return record
