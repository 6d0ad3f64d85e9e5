"""`anyshape extract`: write one Shape of a model as a standard Hugging Face folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from anyshape.checkpoints import load, load_config, load_tokenizer
from anyshape.cli.app import app, emit
from anyshape.cli.options import JsonOpt, ModelArg, OverwriteOpt, out_option
from anyshape.cli.route import route_record, routed
from anyshape.export.hf import export_hf
from anyshape.shape import Shape

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@app.command()
def extract(
    model: ModelArg,
    out: out_option("Output folder (written atomically).", metavar="OUT"),
    shape: Annotated[
        str | None,
        typer.Option(help="Sub-network to keep: inline JSON or a JSON file.", metavar="SHAPE", show_default=False),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            help="Instead of --shape: the Shape the router of a `train --router` run picks for this budget "
            "(0.4, or 60M).",
            metavar="BUDGET",
            show_default=False,
        ),
    ] = None,
    merge: Annotated[
        bool,
        typer.Option(
            "--merge",
            help="Instead of --shape: the whole model, with a run's adapters and modulation or a shared model's "
            "recovery merged into plain weights.",
        ),
    ] = False,
    dtype: Annotated[str, typer.Option(help="Weight dtype: float32, bfloat16 or float16.")] = "float32",
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Extract SHAPE of MODEL into OUT: config.json, model.safetensors, tokenizer, generation
    config and anyshape.json (provenance). It loads with AutoModelForCausalLM. A training run's
    adapters and modulation, and a shared model's recovery, are merged into plain weights.
    Instead of --shape: --budget B, the Shape a `train --router` run's router picks for B
    (`anyshape extract flex/ --budget 0.4 --out m40/`), or --merge, the whole model.

    \b
    Example: anyshape extract smollm2-135m --shape '{"num_hidden_layers": 20}' --out out/small
    """
    import torch

    if dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of {', '.join(DTYPES)}", param_hint="--dtype")
    if (shape is not None) + (budget is not None) + merge != 1:
        raise typer.BadParameter("give exactly one of --shape, --budget and --merge", param_hint="--shape")
    check_out(out, overwrite)  # everything that can fail fast does so before the slow load
    answer = routed(Path(model), budget) if budget is not None else None
    if answer is not None:
        chosen = answer.shape
    else:
        chosen = Shape.full(load_config(model)) if merge else Shape.parse(shape, load_config(model))
    tokenizer = load_tokenizer(model)
    elastic = load(model, dtype=getattr(torch, dtype))
    extra = {"route": route_record(answer)} if answer is not None else None
    export_hf(elastic, chosen, out, tokenizer=tokenizer, parent=model, overwrite=overwrite, extra=extra)
    emit(
        {
            "out": str(out),
            "shape": chosen.to_dict(),
            "num_parameters": chosen.num_parameters(elastic.config),
            "num_parameters_non_embedding": chosen.num_parameters(elastic.config, embeddings=False),
        },
        as_json,
    )


def check_out(out: Path, overwrite: bool) -> None:
    """Raises BadParameter unless `out` can be written: absent (or a folder, with --overwrite),
    under a writable folder."""
    if out.exists() and not overwrite:
        raise typer.BadParameter(f"{out} already exists; choose another --out or pass --overwrite", param_hint="--out")
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"{out} exists and is not a folder; choose another --out", param_hint="--out")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise typer.BadParameter(
            f"cannot create {out}: {ancestor} is not a writable folder; choose another --out",
            param_hint="--out",
        )
