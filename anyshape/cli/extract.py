"""`anyshape extract`: write one Shape of a model as a standard Hugging Face folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from anyshape.checkpoints import load, load_tokenizer
from anyshape.cli.app import app, emit
from anyshape.cli.calibration import read_calibration
from anyshape.cli.options import JsonOpt, ModelArg, OverwriteOpt, out_option
from anyshape.cli.route import route_record, routed
from anyshape.compress.elastic import ElasticRecord, search_elastic
from anyshape.data.text import DEFAULT_TEXT_NAME
from anyshape.export.hf import export_hf
from anyshape.model.llama import ElasticLlama
from anyshape.search.budget import Budget
from anyshape.shape import Shape
from anyshape.train.settings import RUN_FILE

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
SEARCH_SEQUENCES, SEARCH_LENGTH = 8, 256  # the search's calibration windows on an elastic/ model, as compress's


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
            help="Instead of --shape: a budget (0.4 of the parent's parameters, or 60M). The Shape the router of a "
            "`train --router` run picks for it, or, for a compress family's elastic/ model, the best Shape the "
            "family's search finds for it on the trained weights.",
            metavar="BUDGET",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help=f"With --budget on an elastic/ model: the text the search's perplexity is measured on "
            f"({SEARCH_SEQUENCES} windows of {SEARCH_LENGTH} tokens). Default: {DEFAULT_TEXT_NAME}.",
            metavar="FILE",
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
    Instead of --shape: --budget B, the Shape a `train --router` run's router picks for B, or
    the best Shape for B of a compress family's elastic/ model (searched as compress searched
    its members: `anyshape extract family/elastic --budget 0.4 --out m40/`, about a minute for
    SmolLM2-135M on a 2-core CPU); or --merge, the whole model.

    \b
    Example: anyshape extract smollm2-135m --shape '{"num_hidden_layers": 20}' --out out/small
    """
    import torch

    if dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of {', '.join(DTYPES)}", param_hint="--dtype")
    if (shape is not None) + (budget is not None) + merge != 1:
        raise typer.BadParameter("give exactly one of --shape, --budget and --merge", param_hint="--shape")
    check_out(out, overwrite)  # everything that can fail fast does so before the slow load
    if data is not None and budget is None:
        raise typer.BadParameter("--data is read only with --budget (the search's text)", param_hint="--data")
    if budget is not None and ElasticRecord.read(model) is None and not (Path(model) / RUN_FILE).is_file():
        raise typer.BadParameter(
            f"{model} is neither a compress family's elastic/ model nor a `train --router` run; give --shape",
            param_hint="--budget",
        )
    weights = load(model, dtype=torch.float32 if budget is not None else getattr(torch, dtype))
    extra = None
    if budget is not None:
        chosen, extra = budget_shape(Path(model), weights, budget, data)
    else:
        chosen = Shape.full(weights.config) if merge else Shape.parse(shape, weights.config)
    export_hf(
        weights.to(getattr(torch, dtype)), chosen, out, tokenizer=load_tokenizer(model), parent=model,
        overwrite=overwrite, extra=extra,
    )  # fmt: skip
    emit(
        {
            "out": str(out),
            "shape": chosen.to_dict(),
            "num_parameters": chosen.num_parameters(weights.config),
            "num_parameters_non_embedding": chosen.num_parameters(weights.config, embeddings=False),
        },
        as_json,
    )


def budget_shape(model: Path, weights: ElasticLlama, budget: str, data: Path | None) -> tuple[Shape, dict[str, Any]]:
    """The Shape for `budget` of `model` (its float32 `weights`): the best the family's search
    finds on a compress elastic/ model, else a router run's route; with what anyshape.json
    records of how it was chosen."""
    record = ElasticRecord.read(model)
    if record is None:
        answer = routed(model, budget)
        return answer.shape, {"route": route_record(answer)}
    chosen = Budget.parse(budget, weights.config, record.budget_basis)
    windows = read_calibration(str(model), data, SEARCH_SEQUENCES, SEARCH_LENGTH, seed=0)
    best = search_elastic(weights, model, record, chosen, windows)
    return best.shape, {"budget": chosen.fraction, "budget_basis": chosen.basis, "search_ppl": best.quality}


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
