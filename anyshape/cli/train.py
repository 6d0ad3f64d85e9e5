"""`anyshape train`: one-for-all elastic fine-tuning, from options, a config file, or a run to resume.
Its options are TrainSettings' fields (anyshape.train.settings: help texts, defaults, least values)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from anyshape.cli.app import app, emit
from anyshape.cli.options import JsonOpt, given_settings, overwrite_option, settings_command
from anyshape.memory import GiB
from anyshape.train.controller import ControllerFactory
from anyshape.train.settings import TrainSettings, read_config, read_settings

ConfigOpt = Annotated[
    Path | None,
    typer.Option(help="YAML (or JSON) file of settings, keys as the options (seq_len for --seq-len).", metavar="FILE"),
]
ResumeOpt = Annotated[
    Path | None, typer.Option(help="Continue the run in this folder with its recorded settings.", metavar="RUN")
]
ContinueOpt = Annotated[
    bool,
    typer.Option(
        "--continue", help="Continued training of MODEL itself: the same as --sampling largest (next-token loss)."
    ),
]

DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print the memory plan of one step (GiB by part, and what is allowed) and stop: nothing is trained.",
    ),
]
OverwriteRunOpt = overwrite_option("Start over in an --out that holds another run.")


@app.command("train")
@settings_command
def train_command(
    ctx: typer.Context,
    config: ConfigOpt = None,
    resume: ResumeOpt = None,
    *,
    continue_training: ContinueOpt = False,
    dry_run: DryRunOpt = False,
    overwrite: OverwriteRunOpt = False,
    as_json: JsonOpt = False,
    **settings: Any,
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

    Options given on the command line override the --config file's and the resumed run's.

    \b
    Examples:
      anyshape train smollm2-135m --data train.txt --out run/ --steps 200 --seq-len 256
      anyshape train smollm2-135m --router --anchors 0.25,0.5,0.75,1.0 --modulation --data train.txt --out flex/
      anyshape train small/ --continue --dynamic-batch --domains code=code.jsonl,web=web.txt \\
          --reference-losses ref.json --out run/
      anyshape train smollm2-135m --data train.txt --adapter smol --lora-rank 16 --experts 4 --out run/
      anyshape train --config recipes/smollm2-135m/elastic.yaml --resume run/
      anyshape train smollm2-135m --batch-size 16 --seq-len 1024 --out run/ --dry-run   # the memory plan
      torchrun --nproc_per_node 2 -m anyshape train --config recipes/smollm2-135m/elastic.yaml
    """
    from anyshape.train.loop import train

    given = given_settings(ctx) | ({"sampling": "largest"} if continue_training else {})
    base = read_settings(resume).to_dict() if resume is not None else {}
    base |= read_config(config) if config is not None else {}
    pinned = {"out": str(resume)} if resume is not None else {}  # a resumed run stays in its folder
    settings = TrainSettings.from_dict(base | given | pinned, "the options").with_absolute_paths()
    result = train(
        settings, resume=resume is not None, overwrite=overwrite, progress=True,
        log=lambda message: print(message, file=sys.stderr), controller=_controller(settings), dry_run=dry_run,
    )  # fmt: skip
    if dry_run:
        emit({"memory_gib": {part: round(size / GiB, 2) for part, size in result["memory"].items()},
              "allowed_gib": round(result["allowed"] / GiB, 2)}, as_json)  # fmt: skip
    elif os.environ.get("RANK", "0") == "0":  # one report per torchrun launch
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
