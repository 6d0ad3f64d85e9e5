"""`anyshape prune`: targeted structured pruning to an exact architecture (Sheared LLaMA)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from anyshape.cli.app import JsonOpt, MaxMemoryOpt, app, emit
from anyshape.cli.train import DEFAULTS, absolute_paths
from anyshape.train.settings import TrainSettings, read_settings


@app.command("prune")
def prune_command(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Parent: Hugging Face folder, .gguf file, or 'smollm2-135m'.", metavar="MODEL", show_default=False
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help='Target sizes as JSON, e.g. \'{"num_hidden_layers": 16, "hidden_size": 384, '
            '"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 1024}\' '
            "(a size not given: the parent's).",
            metavar="JSON",
        ),
    ] = None,
    target_config: Annotated[
        Path | None,
        typer.Option(help="... or the config.json (or folder) of an existing smaller model.", metavar="CONFIG"),
    ] = None,
    data: Annotated[str | None, typer.Option(help="Training text, as for `anyshape train`.", metavar="SOURCE")] = None,
    domains: Annotated[
        str | None, typer.Option(help="... or several domains, 'name=source,...'.", metavar="DOMAINS")
    ] = None,
    dynamic_batch: Annotated[
        bool, typer.Option(help="Reweight --domains by held-out loss over reference (see `anyshape train`).")
    ] = False,
    reference_losses: Annotated[
        str | None, typer.Option(help="--dynamic-batch: JSON {domain: loss}.", metavar="FILE")
    ] = None,
    reference_model: Annotated[
        str | None, typer.Option(help="--dynamic-batch: ... or a reference model.", metavar="MODEL")
    ] = None,
    domain_update_every: Annotated[
        int, typer.Option(help="--dynamic-batch: steps between reweightings.", min=1)
    ] = DEFAULTS.domain_update_every,
    prune_steps: Annotated[int, typer.Option(help="Optimizer steps of pruning.", min=1)] = 200,
    target_warmup_steps: Annotated[
        int, typer.Option(help="Steps over which the target moves from the parent's sizes to its own.", min=0)
    ] = 0,
    out: Annotated[Path, typer.Option(help="OUT/run: the pruning run; OUT/model: the target model.")] = Path("pruned"),
    resume: Annotated[bool, typer.Option(help="Continue the pruning run in OUT with its recorded settings.")] = False,
    kd: Annotated[
        str, typer.Option(help="none (next-token loss, as Sheared LLaMA), or distillation from the parent.")
    ] = "none",
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence.", min=2)] = DEFAULTS.seq_len,
    batch_size: Annotated[int, typer.Option(help="Sequences per optimizer step.", min=1)] = DEFAULTS.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.", min=1)] = DEFAULTS.grad_accum,
    lr: Annotated[float, typer.Option(help="The model's learning rate (0: masks only, the model frozen).")] = 1e-4,
    mask_lr: Annotated[float, typer.Option(help="The masks' learning rate.")] = DEFAULTS.mask_lr,
    lambda_lr: Annotated[float, typer.Option(help="The Lagrange multipliers' (gradient ascent).")] = (
        DEFAULTS.lambda_lr
    ),
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.", min=1)] = DEFAULTS.save_every,
    eval_every: Annotated[int, typer.Option(help="Held-out perplexity every N steps.", min=1)] = DEFAULTS.eval_every,
    seed: Annotated[int, typer.Option(help="Seed of data order and mask noise.")] = DEFAULTS.seed,
    max_memory: MaxMemoryOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Start over in an OUT that holds another run.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Prune MODEL to an exact target architecture (Sheared LLaMA, docs/methods.md).

    Hard-concrete masks on layers, hidden channels, KV groups, query heads and MLP neurons learn
    together with the model (next-token loss of the masked model) while a Lagrangian, whose
    multipliers ascend, drives the masks' expected sizes to the target's. Then every layer keeps
    its top units by mask score, the model is sorted so they come first, and the target is
    written to OUT/model: a standard Hugging Face folder with exactly the target's sizes. It runs
    on the loop of `anyshape train` (checkpoints, --resume, torchrun); continue training with
    `anyshape train OUT/model --continue --dynamic-batch --domains ...`.

    \b
    Example: anyshape prune smollm2-135m --target-config small/config.json --data train.txt --out sheared/
    """
    from anyshape.checkpoints import load_config
    from anyshape.prune.pipeline import RUN, prune
    from anyshape.prune.target import PruningTarget

    if resume:
        if not (out / RUN).is_dir():
            raise typer.BadParameter(
                f"{out} holds no pruning run to resume; start one without --resume", param_hint="--out"
            )
        settings = read_settings(out / RUN)
        if max_memory is not None:
            settings = dataclasses.replace(settings, max_memory=max_memory).check()
    else:
        if model is None:
            raise typer.BadParameter("name the MODEL to prune (or pass --resume)", param_hint="MODEL")
        if (target is None) == (target_config is None):
            raise typer.BadParameter("give exactly one of --target and --target-config", param_hint="--target")
        goal = PruningTarget.parse(target if target is not None else target_config, load_config(model))
        settings = TrainSettings(
            model=model, data=data, domains=domains, dynamic_batch=dynamic_batch, reference_losses=reference_losses,
            reference_model=reference_model, domain_update_every=domain_update_every, prune_target=goal.to_dict(),
            target_warmup_steps=target_warmup_steps, mask_lr=mask_lr, lambda_lr=lambda_lr, sampling="largest",
            kd=kd, steps=prune_steps, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
            save_every=save_every, eval_every=eval_every, seed=seed, warmup_steps=max(1, prune_steps // 10),
            max_memory=max_memory,
        )  # fmt: skip
        settings = absolute_paths(settings).check()
    result = prune(
        settings, out, resume=resume, overwrite=overwrite, progress=True,
        log=lambda message: print(message, file=sys.stderr),
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0" and result is not None:
        folder, shape = result
        record = json.loads((folder / "config.json").read_text())
        sizes = {name: record[name] for name in settings.prune_target}
        emit({"out": str(folder), "shape": shape.to_dict(), "config": sizes}, as_json)
