"""`anyshape extract`: write one Shape of a model as a standard Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anyshape.cli.app import JsonOpt, ModelArg, app, emit
from anyshape.export.hf import export_hf
from anyshape.model.load import load, load_config, load_tokenizer
from anyshape.shape import Shape

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@app.command()
def extract(
    model: ModelArg,
    shape: Annotated[str, typer.Option(help="Sub-network to keep: inline JSON or a JSON file.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder (written atomically).", show_default=False)],
    dtype: Annotated[str, typer.Option(help="Weight dtype: float32, bfloat16 or float16.")] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Extract SHAPE of MODEL into OUT: config.json, model.safetensors, tokenizer,
    generation config and anyshape.json (provenance). It loads with AutoModelForCausalLM.

    Example: anyshape extract smollm2-135m --shape '{"num_hidden_layers": 20}' --out out/small
    """
    import torch

    if dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of {', '.join(DTYPES)}", param_hint="--dtype")
    if out.exists() and not overwrite:  # fail before the slow load
        raise typer.BadParameter(f"{out} already exists; choose another --out or pass --overwrite", param_hint="--out")
    chosen = Shape.parse(shape, load_config(model))
    elastic = load(model, dtype=getattr(torch, dtype))
    export_hf(elastic, chosen, out, tokenizer=load_tokenizer(model), parent=model, overwrite=overwrite)
    emit(
        {
            "out": str(out),
            "shape": chosen.to_dict(),
            "num_parameters": chosen.num_parameters(elastic.config),
            "num_parameters_non_embedding": chosen.num_parameters(elastic.config, embeddings=False),
        },
        as_json,
    )
