"""`anyshape prune`: targeted structured pruning to an exact architecture (Sheared LLaMA)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from anyshape.cli.app import app, emit
from anyshape.cli.options import JsonOpt, out_option, overwrite_option, train_option
from anyshape.train.settings import TrainSettings, read_settings

DEFAULTS = TrainSettings()
PRUNE_STEPS = 200


@app.command("prune")
def prune_command(
    model: train_option("model") = None,
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
    data: train_option("data") = None,
    domains: train_option("domains") = None,
    dynamic_batch: train_option("dynamic_batch") = False,
    reference_losses: train_option("reference_losses") = None,
    reference_model: train_option("reference_model") = None,
    domain_update_every: train_option("domain_update_every") = DEFAULTS.domain_update_every,
    prune_steps: train_option("steps", help="Optimizer steps of pruning (the run's steps).") = PRUNE_STEPS,
    target_warmup_steps: train_option("target_warmup_steps") = DEFAULTS.target_warmup_steps,
    out: out_option("OUT/run: the pruning run; OUT/model: the target model.") = Path("pruned"),
    resume: Annotated[bool, typer.Option(help="Continue the pruning run in OUT with its recorded settings.")] = False,
    kd: train_option(
        "kd", note="prune's default: none (the next-token loss, as Sheared LLaMA); train's: cosine."
    ) = "none",
    seq_len: train_option("seq_len") = DEFAULTS.seq_len,
    batch_size: train_option("batch_size") = DEFAULTS.batch_size,
    grad_accum: train_option("grad_accum") = DEFAULTS.grad_accum,
    lr: train_option("lr", help="The model's learning rate (0: masks only, the model frozen).") = 1e-4,
    mask_lr: train_option("mask_lr") = DEFAULTS.mask_lr,
    lambda_lr: train_option("lambda_lr") = DEFAULTS.lambda_lr,
    save_every: train_option("save_every") = DEFAULTS.save_every,
    eval_every: train_option("eval_every") = DEFAULTS.eval_every,
    seed: train_option("seed", help="Seed of data order and mask noise.") = DEFAULTS.seed,
    max_memory: train_option("max_memory") = None,
    overwrite: overwrite_option("Start over in an OUT that holds another run.") = False,
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
        settings = settings.with_absolute_paths().check()
    result = prune(
        settings, out, resume=resume, overwrite=overwrite, progress=True,
        log=lambda message: print(message, file=sys.stderr),
    )  # fmt: skip
    if os.environ.get("RANK", "0") == "0" and result is not None:
        folder, shape = result
        record = json.loads((folder / "config.json").read_text())
        sizes = {name: record[name] for name in settings.prune_target}
        emit({"out": str(folder), "shape": shape.to_dict(), "config": sizes}, as_json)
