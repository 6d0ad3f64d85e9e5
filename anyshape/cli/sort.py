"""`anyshape sort`: permute a model so its most important units come first."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anyshape.checkpoints import load, load_config, load_tokenizer
from anyshape.cli.app import app, emit
from anyshape.cli.extract import check_out
from anyshape.cli.options import JsonOpt, ModelArg, OverwriteOpt, out_option
from anyshape.export.hf import export_hf
from anyshape.importance.permute import sort_
from anyshape.importance.scores import SCORES_FILENAME, Scores


@app.command("sort")
def sort_command(
    model: ModelArg,
    scores: Annotated[Path, typer.Option(help="Scores file from `anyshape importance`.", show_default=False)],
    out: out_option("Output folder (written atomically)."),
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Sort MODEL's units by importance and save it as a standard Hugging Face folder.

    Neurons, KV groups, query heads within each group and embedding channels are permuted
    (through every weight that touches them), so the logits do not change, and every Shape
    of the sorted model keeps the most important units. The folder also holds the scores in
    the sorted order (importance.safetensors).

    \b
    Example: anyshape sort smollm2-135m --scores scores.safetensors --out sorted/
    """
    check_out(out, overwrite)  # fail before the slow load
    loaded_scores = Scores.load(scores, load_config(model))
    elastic = load(model)
    sorted_scores = sort_(elastic, loaded_scores)
    export_hf(
        elastic,
        elastic.full_shape,
        out,
        tokenizer=load_tokenizer(model),
        parent=model,
        overwrite=overwrite,
        extra={"sorted_by": loaded_scores.info},
    )
    sorted_scores.save(out / SCORES_FILENAME)
    emit({"out": str(out), "sorted_by": loaded_scores.info}, as_json)
