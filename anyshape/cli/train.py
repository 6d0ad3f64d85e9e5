"""`anyshape train`: one-for-all elastic fine-tuning, from options, a config file, or a run to resume."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import _click

from anyshape.cli.app import JsonOpt, MaxMemoryOpt, app, emit
from anyshape.cli.search import AlignOpt
from anyshape.errors import AnyshapeError
from anyshape.search.budget import parse_anchors
from anyshape.search.space import parse_fractions
from anyshape.train.controller import ControllerFactory
from anyshape.train.settings import TrainSettings, read_settings

DEFAULTS = TrainSettings()
ROUTER_PANEL = "Budget router (LLaMaFlex)"
DOMAINS_PANEL = "Domains and dynamic batch loading (Sheared LLaMA)"


@app.command("train")
def train_command(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(
            help="Parent: Hugging Face folder (ideally sorted by `anyshape sort`), .gguf file, or 'smollm2-135m'.",
            metavar="MODEL",
            show_default=False,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML (or JSON) file of settings, keys as the options (seq_len for --seq-len).", metavar="FILE"
        ),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this folder with its recorded settings.", metavar="RUN")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Training text: .txt, .jsonl ('text'), .parquet ('text'), a folder of those, or a datasets name "
            "in the local cache. Default: the embedded text.",
            metavar="SOURCE",
        ),
    ] = None,
    val_data: Annotated[
        str | None, typer.Option(help="Held-out text, as --data. Default: --val-fraction of --data.", metavar="SOURCE")
    ] = None,
    out: Annotated[str, typer.Option(help="Run folder: settings, checkpoint, metrics.jsonl.")] = DEFAULTS.out,
    sampling: Annotated[
        str,
        typer.Option(
            help="Shapes per step: sandwich (largest, smallest, --random-shapes random), grid (largest and one per "
            "parameter bin), fixed (largest and --shapes), largest (it alone)."
        ),
    ] = DEFAULTS.sampling,
    random_shapes: Annotated[
        int, typer.Option(help="sandwich: random Shapes per step; grid: parameter bins.", min=0)
    ] = DEFAULTS.random_shapes,
    shapes: Annotated[
        str | None, typer.Option(help="fixed: a JSON list of Shapes, inline or a file.", metavar="SHAPES")
    ] = None,
    fractions: Annotated[str, typer.Option(help="Grid of sizes per axis, as fractions of the parent.")] = (
        ",".join(f"{f:g}" for f in DEFAULTS.fractions)
    ),
    align: AlignOpt = DEFAULTS.align,
    kd: Annotated[
        str,
        typer.Option(help="Distillation from the largest Shape: forward-kl, reverse-kl, js, cosine, l2, or none."),
    ] = DEFAULTS.kd,
    balance_losses: Annotated[
        bool, typer.Option(help="Scale each Shape's loss to the largest's running magnitude (AmoebaLLM).")
    ] = DEFAULTS.balance_losses,
    adapter: Annotated[
        str,
        typer.Option(help="full (every weight), lora, or smol (Shape-gated LoRA experts); base frozen with adapters."),
    ] = DEFAULTS.adapter,
    all_weights: Annotated[
        bool,
        typer.Option(
            help="With --adapter full, train every weight, also those the model keeps frozen (a compact model of "
            "anyshape share: its stored weights, not only its recovery)."
        ),
    ] = DEFAULTS.all_weights,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.", min=1)] = DEFAULTS.lora_rank,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha. Default: 2 x rank.")] = None,
    experts: Annotated[int, typer.Option(help="smol: LoRA experts per projection.", min=1)] = DEFAULTS.experts,
    top_k: Annotated[int, typer.Option(help="smol: experts each Shape uses.", min=1)] = DEFAULTS.top_k,
    steps: Annotated[int, typer.Option(help="Optimizer steps.", min=1)] = DEFAULTS.steps,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence.", min=2)] = DEFAULTS.seq_len,
    batch_size: Annotated[
        int, typer.Option(help="Sequences per optimizer step, over all processes and accumulation.", min=1)
    ] = DEFAULTS.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.", min=1)] = DEFAULTS.grad_accum,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate. Default: 1e-4 full, 1e-3 adapters.")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.", min=0)] = DEFAULTS.weight_decay,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps, then cosine.", min=0)] = DEFAULTS.warmup_steps,
    min_lr_ratio: Annotated[float, typer.Option(help="Final learning rate / peak.")] = DEFAULTS.min_lr_ratio,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm (0: none).", min=0)] = (
        DEFAULTS.max_grad_norm
    ),
    on_nonfinite: Annotated[
        str,
        typer.Option(
            help="A step whose loss or gradient is NaN or inf: skip it (logged, not applied) or stop the run "
            "with an error naming the step (after a checkpoint of the steps before it)."
        ),
    ] = DEFAULTS.on_nonfinite,
    max_memory: MaxMemoryOpt = None,
    precision: Annotated[
        str, typer.Option(help="auto (bf16 autocast on a CUDA GPU that has it, else fp32), fp32 or bf16.")
    ] = DEFAULTS.precision,
    distributed: Annotated[
        str, typer.Option(help="Under torchrun: ddp, or fsdp (sharded per decoder layer).")
    ] = DEFAULTS.distributed,
    val_fraction: Annotated[float, typer.Option(help="Held-out share of --data without --val-data.")] = (
        DEFAULTS.val_fraction
    ),
    val_batches: Annotated[int, typer.Option(help="Held-out batches per evaluation.", min=1)] = DEFAULTS.val_batches,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (and at the end).", min=1)] = (
        DEFAULTS.save_every
    ),
    eval_every: Annotated[int, typer.Option(help="Held-out perplexity every N steps.", min=1)] = DEFAULTS.eval_every,
    log_every: Annotated[int, typer.Option(help="Write metrics every N steps.", min=1)] = DEFAULTS.log_every,
    seed: Annotated[int, typer.Option(help="Seed of data order, Shape sampling and adapter init.")] = DEFAULTS.seed,
    router: Annotated[
        bool,
        typer.Option(
            help="Learn a budget router: the students are the Shapes it samples at each --anchors budget.",
            rich_help_panel=ROUTER_PANEL,
        ),
    ] = DEFAULTS.router,
    anchors: Annotated[
        str,
        typer.Option(
            help="Budgets the router trains at, fractions of the parent's parameters.",
            rich_help_panel=ROUTER_PANEL,
        ),
    ] = ",".join(f"{a:g}" for a in DEFAULTS.anchors),
    budget_basis: Annotated[
        str,
        typer.Option(help="Budgets count total or non-embedding parameters.", rich_help_panel=ROUTER_PANEL),
    ] = DEFAULTS.budget_basis,
    budget_weight: Annotated[
        float,
        typer.Option(help="Weight of the over-budget penalty.", min=0, rich_help_panel=ROUTER_PANEL),
    ] = DEFAULTS.budget_weight,
    router_lr: Annotated[
        float, typer.Option(help="The router's learning rate.", rich_help_panel=ROUTER_PANEL)
    ] = DEFAULTS.router_lr,
    tau_start: Annotated[
        float,
        typer.Option(help="Gumbel-softmax temperature at the start.", rich_help_panel=ROUTER_PANEL),
    ] = DEFAULTS.tau_start,
    tau_end: Annotated[
        float,
        typer.Option(help="... annealed exponentially to this at the end.", rich_help_panel=ROUTER_PANEL),
    ] = DEFAULTS.tau_end,
    router_only: Annotated[
        bool,
        typer.Option(
            help="Train the router alone, the model frozen (with --modulation: and the modulation).",
            rich_help_panel=ROUTER_PANEL,
        ),
    ] = DEFAULTS.router_only,
    domains: Annotated[
        str | None,
        typer.Option(
            help="Instead of --data: several domains, 'name=source,...', each batch mixed by domain weights "
            "(initially their token shares).",
            metavar="DOMAINS",
            rich_help_panel=DOMAINS_PANEL,
        ),
    ] = None,
    dynamic_batch: Annotated[
        bool,
        typer.Option(
            help="Every --domain-update-every steps, up-weight the domains whose held-out loss is furthest above "
            "its reference: w <- normalise(w * exp(max(loss - ref, 0))).",
            rich_help_panel=DOMAINS_PANEL,
        ),
    ] = DEFAULTS.dynamic_batch,
    reference_losses: Annotated[
        str | None,
        typer.Option(
            help="--dynamic-batch: a JSON file {domain: reference loss, nats per token}.",
            metavar="FILE",
            rich_help_panel=DOMAINS_PANEL,
        ),
    ] = None,
    reference_model: Annotated[
        str | None,
        typer.Option(
            help="--dynamic-batch: ... or a model whose held-out losses are the references.",
            metavar="MODEL",
            rich_help_panel=DOMAINS_PANEL,
        ),
    ] = None,
    domain_update_every: Annotated[
        int, typer.Option(help="--dynamic-batch: steps between reweightings.", min=1, rich_help_panel=DOMAINS_PANEL)
    ] = DEFAULTS.domain_update_every,
    continue_training: Annotated[
        bool,
        typer.Option(
            "--continue",
            help="Continued training of MODEL itself: the same as --sampling largest (next-token loss).",
        ),
    ] = False,
    modulation: Annotated[
        bool,
        typer.Option(
            help="Shape-conditioned output scales after every attention and MLP block, folded in at export.",
            rich_help_panel=ROUTER_PANEL,
        ),
    ] = DEFAULTS.modulation,
    overwrite: Annotated[bool, typer.Option(help="Start over in an --out that holds another run.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train MODEL once so that every Shape of its search space works (one-for-all).

    Each step trains the largest Shape on the next token and the sampled smaller Shapes by
    in-place distillation from it, on the same batch, with shared weights (or shared frozen
    weights and LoRA / SMOL adapters). Checkpoints are atomic; Ctrl-C saves the last finished
    step, and --resume RUN continues exactly where an uninterrupted run would be. Under
    torchrun every process trains its share of each batch (DDP or FSDP).

    Afterwards RUN is a MODEL for every command: `anyshape evaluate RUN --shape S --ppl`,
    `anyshape extract RUN --shape S --out small/` (adapters merged: a plain HF model).

    With --router, a router learns which Shape to use for any parameter budget: `anyshape route
    RUN --budget 0.4` names it, `anyshape extract RUN --budget 0.4 --out m40/` writes it.

    \b
    Examples:
      anyshape train smollm2-135m --data train.txt --out run/ --steps 200 --seq-len 256
      anyshape train smollm2-135m --router --anchors 0.25,0.5,0.75,1.0 --modulation --data train.txt --out flex/
      anyshape train small/ --continue --dynamic-batch --domains code=code.jsonl,web=web.txt \\
          --reference-losses ref.json --out run/
      anyshape train smollm2-135m --data train.txt --adapter smol --lora-rank 16 --experts 4 --out run/
      anyshape train --config recipes/smollm2-135m/elastic.yaml --resume run/
      torchrun --nproc_per_node 2 -m anyshape train --config recipes/smollm2-135m/elastic.yaml
    """
    from anyshape.train.loop import train

    given = {
        name: value
        for name, value in ctx.params.items()
        if ctx.get_parameter_source(name) == _click.core.ParameterSource.COMMANDLINE
        and name not in ("config", "resume", "overwrite", "as_json", "continue_training")
    }
    if continue_training:
        given["sampling"] = "largest"
    given = _typed(given)
    if resume is not None:
        recorded = read_settings(resume).to_dict()
        if config is not None:
            recorded.update(_read_config(config))
        settings = TrainSettings.from_dict({**recorded, **given, "out": str(resume)}, "the options")
    else:
        base = _read_config(config) if config is not None else {}
        settings = TrainSettings.from_dict({**base, **given}, "the options")
    settings = absolute_paths(settings)
    result = train(
        settings, resume=resume is not None, overwrite=overwrite, progress=True,
        log=lambda message: print(message, file=sys.stderr), controller=_controller(settings),
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # one report per torchrun launch
        emit({key: result.get(key) for key in ("step", "loss", "val_ppl")} | {"out": settings.out}, as_json)


def _controller(settings: TrainSettings) -> ControllerFactory | None:
    """What learns the students of `settings`: the budget router, pruning's masks, or nothing."""
    if settings.router:
        from anyshape.router.control import RouterControl

        return RouterControl
    if settings.prune_target is not None:
        from anyshape.prune.control import PruningControl

        return PruningControl
    return None


def _typed(given: dict[str, Any]) -> dict[str, Any]:
    """Command-line strings that the settings hold as structures: fractions and Shapes."""
    if "fractions" in given:
        given["fractions"] = parse_fractions(given["fractions"])
    if "shapes" in given:
        given["shapes"] = _read_shapes(given["shapes"])
    if "anchors" in given:
        given["anchors"] = parse_anchors(given["anchors"])
    return given


def _read_shapes(text: str) -> tuple[dict[str, Any], ...]:
    inline = text.lstrip().startswith(("{", "["))
    try:
        shapes = json.loads(text if inline or not Path(text).is_file() else Path(text).read_text())
    except (OSError, ValueError, RecursionError):
        raise typer.BadParameter(
            f"{text!r} is neither a JSON file nor inline JSON; write a list of Shapes, e.g. "
            '\'[{"hidden_size": 288}, {"num_hidden_layers": 20}]\'',
            param_hint="--shapes",
        ) from None
    shapes = shapes if isinstance(shapes, list) else [shapes]
    if not all(isinstance(shape, dict) for shape in shapes):
        raise typer.BadParameter("each Shape must be a JSON object", param_hint="--shapes")
    return tuple(shapes)


def _read_config(path: Path) -> dict[str, Any]:
    """A config file's settings (YAML or JSON mapping); `shapes` may name a JSON file."""
    import yaml

    if not path.is_file():
        raise typer.BadParameter(f"config file {str(path)!r} not found", param_hint="--config")
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
        record["shapes"] = _read_shapes(record["shapes"])
    TrainSettings.from_dict(record, str(path))  # unknown keys are named with the file
    return record


def absolute_paths(settings: TrainSettings) -> TrainSettings:
    """Local paths made absolute, so the run folder works from any directory."""

    def absolute(value: str | None) -> str | None:
        try:
            return str(Path(value).expanduser().resolve()) if Path(value).expanduser().exists() else value
        except (TypeError, OSError):  # None, or not a usable path (e.g. a dataset name, or too long for one)
            return value

    domains = settings.domains
    if domains is not None:
        domains = ",".join(
            f"{name.strip()}={absolute(source.strip())}" if sep else entry
            for entry in domains.split(",")
            for name, sep, source in [entry.partition("=")]
        )
    return replace(
        settings, model=absolute(settings.model), data=absolute(settings.data), val_data=absolute(settings.val_data),
        domains=domains, reference_losses=absolute(settings.reference_losses),
        reference_model=absolute(settings.reference_model),
    )  # fmt: skip
