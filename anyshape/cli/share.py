"""`anyshape share`: adjacent-layer weight sharing with low-rank recovery (SHARP)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from anyshape.checkpoints import load_config
from anyshape.cli.app import app, emit
from anyshape.cli.options import JsonOpt, ModelArg, out_option, overwrite_option, train_option
from anyshape.share.plan import COMPONENT_CHOICES, RECOVERIES, STRATEGIES, build_plan
from anyshape.share.storage import storage_summary
from anyshape.train.settings import TrainSettings

DEFAULTS = TrainSettings()


@app.command("share")
def share_command(
    model: ModelArg,
    out: out_option("Output folder: the compact shared model (written atomically)."),
    replace: Annotated[
        str,
        typer.Option(
            help=f"Plan: {', '.join(STRATEGIES)}. next-interval: from --start-layer, in groups of --group layers, "
            "the first keeps its weights and the others read them (group 2: every other layer reads its "
            "predecessor's); consecutive: layers start+1..start+COUNT read layer --start-layer; explicit: --pairs."
        ),
    ] = "next-interval",
    start_layer: Annotated[int | None, typer.Option(help="First reference layer (next-interval, consecutive).")] = None,
    group: Annotated[int, typer.Option(help="next-interval: layers per group (one reference, group - 1 readers).")] = 2,
    count: Annotated[
        int | None, typer.Option(help="Layers to replace: consecutive's block length; next-interval's cap.")
    ] = None,
    pairs: Annotated[
        str | None, typer.Option(help="explicit: layer:reference pairs, e.g. 11:10,13:12.", metavar="PAIRS")
    ] = None,
    components: Annotated[
        str, typer.Option(help=f"What replaced layers read: {', '.join(COMPONENT_CHOICES)}.")
    ] = "mlp",
    recovery: Annotated[
        str,
        typer.Option(
            help=f"Recovery per replaced projection: {', '.join(RECOVERIES)}. lowrank: W_ref + B A; scaled: "
            "s * W_ref + B A (per-output-channel s, rank - 1: the same parameter count)."
        ),
    ] = "lowrank",
    rank: Annotated[int, typer.Option(help="Recovery rank (0: share the weights directly).", min=0)] = 32,
    data: train_option("data") = None,
    val_data: train_option("val_data", help="Held-out text for stage 2, as --data. Default: 5% of --data.") = None,
    warmup_steps: Annotated[int, typer.Option(help="Stage 1: Adam steps of the single-layer warm-up.", min=0)] = 200,
    warmup_sequences: Annotated[
        int, typer.Option(help="Stage 1: sequences whose layer inputs are recorded (10% held out).", min=2)
    ] = 64,
    warmup_lr: Annotated[float, typer.Option(help="Stage 1: learning rate.")] = 1e-3,
    finetune_steps: Annotated[
        int, typer.Option(help="Stage 2: steps of end-to-end fine-tuning of the recovery (0: none).", min=0)
    ] = 200,
    finetune_weights: Annotated[
        bool,
        typer.Option(
            help="Stage 2: train every stored weight too, not only the recovery (a shared weight learns from both "
            "layers that read it; still stored once)."
        ),
    ] = False,
    lr: train_option(
        "lr", help="Stage 2: peak learning rate (warmup, then cosine); share's default, for the recovery."
    ) = 5e-4,
    seq_len: train_option("seq_len", note="Both stages.") = DEFAULTS.seq_len,
    batch_size: train_option("batch_size", note="Both stages.") = DEFAULTS.batch_size,
    save_every: train_option("save_every", note="Stage 2.") = DEFAULTS.save_every,
    precision: train_option("precision", note="Stage 2.") = DEFAULTS.precision,
    max_memory: train_option("max_memory") = None,
    seed: Annotated[int, typer.Option(help="Seed of the data order and the warm-up's batches.")] = 0,
    work: Annotated[
        Path | None, typer.Option(help="Working folder of the stages. Default: OUT.work, removed at the end.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted share from its working folder.")] = False,
    overwrite: overwrite_option("Replace OUT, and start over in a used working folder.") = False,
    as_json: JsonOpt = False,
) -> None:
    """Share adjacent layers' weights, with low-rank recovery (SHARP), and save a compact model.

    Each replaced layer computes with an earlier layer's weights (the same tensor, stored once)
    plus its own small recovery. Stage 1 fits each replaced layer's recovery so that its output
    matches the original layer's on recorded inputs (L2, every layer on its own); stage 2
    fine-tunes all recovery parameters end to end on the next-token loss with the training loop
    of `anyshape train` (checkpoints, --resume, torchrun). OUT stores each tensor once plus the
    recovery factors; it is a MODEL for every command: `anyshape evaluate OUT --ppl`, `anyshape
    info OUT` (stored vs effective size), `anyshape extract OUT --merge --out plain/` (a plain
    Hugging Face model, recovery merged, no storage saving).

    \b
    Examples:
      anyshape share smollm2-135m --replace next-interval --start-layer 10 --rank 32 \\
          --components mlp --data train.txt --warmup-steps 200 --finetune-steps 200 --out shared/
      anyshape share smollm2-135m --replace explicit --pairs 21:20,23:22 --recovery scaled --out shared/
      anyshape share smollm2-135m --replace consecutive --start-layer 20 --count 4 --out shared/
      torchrun --nproc_per_node 2 -m anyshape share smollm2-135m --start-layer 10 --out shared/
    """
    from anyshape.share.pipeline import ShareSettings, share

    config = load_config(model)
    plan = build_plan(
        replace, config.num_hidden_layers, start_layer, count, group, pairs, components, recovery, rank
    )  # bad plans fail before anything loads
    settings = ShareSettings(
        model=model, plan=plan, out=str(out), data=_absolute(data), val_data=_absolute(val_data), seq_len=seq_len,
        warmup_steps=warmup_steps, warmup_sequences=warmup_sequences, warmup_lr=warmup_lr,
        finetune_steps=finetune_steps, finetune_weights=finetune_weights, batch_size=batch_size, lr=lr,
        save_every=save_every, precision=precision, max_memory=max_memory, seed=seed,
        work=None if work is None else str(work.absolute()),
    )  # fmt: skip
    summary = share(
        settings, resume=resume, overwrite=overwrite, progress=True, log=lambda message: print(message, file=sys.stderr)
    )
    if os.environ.get("RANK", "0") != "0":  # one report per torchrun launch
        return
    fits = summary.pop("warmup")
    record = summary | {
        "replaced_layers": list(plan.replaced),
        "warmup_error_direct": _mean(fit["direct"] for fit in fits),
        "warmup_error_after": _mean(fit["final"] for fit in fits),
    }
    emit(record | storage_summary(out), as_json)


def _absolute(source: str | None) -> str | None:
    """A local path made absolute (the stage 2 run records it); a dataset name as it is."""
    return str(Path(source).resolve()) if source is not None and Path(source).exists() else source


def _mean(values) -> float:
    values = list(values)
    return round(sum(values) / len(values), 4)
