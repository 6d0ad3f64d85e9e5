"""`anyshape layers`: choose which layers to keep for each depth."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anyshape.checkpoints import load, load_config
from anyshape.cli.app import app, emit
from anyshape.cli.calibration import read_calibration
from anyshape.cli.options import BatchSizeOpt, DataOpt, JsonOpt, ModelArg, NumSequencesOpt, SeedOpt, SequenceLengthOpt
from anyshape.importance.layers import select_layers
from anyshape.importance.scores import Scores


@app.command()
def layers(
    model: ModelArg,
    method: Annotated[
        str, typer.Option(help="dp (dynamic programme), bi (rank by layer score) or drop (iterative).")
    ] = "dp",
    keep: Annotated[int | None, typer.Option(help="Layers to keep. Default: every depth.", show_default=False)] = None,
    data: DataOpt = None,
    scores: Annotated[
        Path | None,
        typer.Option(help="Layer scores for --method bi (default: measure block importance).", show_default=False),
    ] = None,
    num_sequences: NumSequencesOpt = 4,
    sequence_length: SequenceLengthOpt = 128,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 4,
    as_json: JsonOpt = False,
) -> None:
    """Choose the layers to keep at each depth, judged by calibration perplexity.

    dp: AmoebaLLM's dynamic programme, O(L^2) evaluations, the best set for every depth at
    once. bi: keep the layers with the highest block importance. drop: ShortGPT-style,
    remove the least important layer and re-measure, until KEEP remain.

    \b
    Example: anyshape layers sorted/ --method dp --keep 20 --data calib.txt --json
    """
    layer_scores = Scores.load(scores, load_config(model)).layers if scores else None
    input_ids = read_calibration(model, data, num_sequences, sequence_length, seed)
    selection = select_layers(load(model), input_ids, method, keep, layer_scores, batch_size, progress=True)
    record = selection.to_dict()
    if not as_json:
        record["depths"] = {d["keep"]: f"{d['layers']}  ppl {d['perplexity']:.2f}" for d in record["depths"]}
    emit(record, as_json)
