"""`anyshape importance`: score every prunable unit on calibration text."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from anyshape.checkpoints import load
from anyshape.cli.app import app, emit
from anyshape.cli.calibration import read_calibration
from anyshape.cli.options import (
    BatchSizeOpt,
    DataOpt,
    JsonOpt,
    ModelArg,
    NumSequencesOpt,
    SeedOpt,
    SequenceLengthOpt,
    out_option,
)
from anyshape.data.calibration import NUM_SEQUENCES, SEQUENCE_LENGTH
from anyshape.importance.scores import score


@app.command()
def importance(
    model: ModelArg,
    out: out_option("Scores file to write (.safetensors)."),
    data: DataOpt = None,
    metric: Annotated[str, typer.Option(help="activation, magnitude or taylor.")] = "activation",
    agg_batch: Annotated[
        str, typer.Option(help="Activation aggregation over sequences: mean, norm or variance.")
    ] = "mean",
    agg_seq: Annotated[
        str, typer.Option(help="Activation aggregation over positions: mean, norm or variance.")
    ] = "mean",
    layer_metric: Annotated[
        str, typer.Option(help="bi (block importance) or drop (perplexity rise when skipped).")
    ] = "bi",
    num_sequences: NumSequencesOpt = NUM_SEQUENCES,
    sequence_length: SequenceLengthOpt = SEQUENCE_LENGTH,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 4,
    as_json: JsonOpt = False,
) -> None:
    """Score MODEL's neurons, attention heads, KV groups, embedding channels and layers.

    The scores file (safetensors) holds one tensor per unit kind, higher = more important, and a
    JSON header saying how they were computed. Feed it to `anyshape sort`.

    \b
    Example: anyshape importance smollm2-135m --data calib.txt --out scores.safetensors
    """
    input_ids = read_calibration(model, data, num_sequences, sequence_length, seed)
    elastic = load(model)
    started = time.perf_counter()
    scores = score(elastic, input_ids, metric, agg_batch, agg_seq, layer_metric, batch_size, progress=True)
    scores.info.update(model=model, data=str(data) if data else "default", seed=seed)
    scores.save(out)
    ranking = scores.layers.argsort(descending=True).tolist()
    emit(
        {
            "out": str(out),
            **scores.info,
            "seconds": round(time.perf_counter() - started, 1),
            "layers_most_important_first": ranking,
        },
        as_json,
    )
