"""`anyshape rpd`: compare scoring schemes by Relative Perplexity Decrease."""

from __future__ import annotations

from typing import Annotated

import typer

from anyshape.checkpoints import load, load_tokenizer
from anyshape.cli.app import app, emit
from anyshape.cli.options import BatchSizeOpt, DataOpt, JsonOpt, ModelArg, NumSequencesOpt, SeedOpt, SequenceLengthOpt
from anyshape.data.calibration import calibration_ids
from anyshape.data.text import load_text
from anyshape.importance.rpd import DEFAULT_SCHEMES, Scheme, relative_perplexity_decrease


@app.command()
def rpd(
    model: ModelArg,
    data: DataOpt = None,
    samples: Annotated[int, typer.Option(help="Random Shapes to average over.", min=1)] = 50,
    schemes: Annotated[
        str, typer.Option(help="Comma-separated: activation[:AGG_B:AGG_S], magnitude, taylor.")
    ] = ",".join(DEFAULT_SCHEMES),
    num_sequences: NumSequencesOpt = 16,
    sequence_length: SequenceLengthOpt = 256,
    eval_sequences: Annotated[int, typer.Option(help="Held-out windows for each perplexity.", min=1)] = 4,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 4,
    as_json: JsonOpt = False,
) -> None:
    """Relative Perplexity Decrease of sorting by each scoring scheme, over random Shapes.

    RPD = mean over SAMPLES random Shapes of (PPL unsorted - PPL sorted) / PPL unsorted; higher
    is better. Scores use NUM_SEQUENCES calibration windows; perplexities use EVAL_SEQUENCES
    other windows of the same text (another seed).

    \b
    Example: anyshape rpd smollm2-135m --data calib.txt --samples 50 --json
    """
    parsed = [Scheme.parse(text) for text in schemes.split(",") if text.strip()]
    if not parsed:
        raise typer.BadParameter(
            f"{schemes!r} names no scheme; e.g. {','.join(DEFAULT_SCHEMES)}", param_hint="--schemes"
        )
    text, tokenizer = load_text(data), load_tokenizer(model)
    calibration = calibration_ids(tokenizer, text, num_sequences, sequence_length, seed)
    held_out = calibration_ids(tokenizer, text, eval_sequences, sequence_length, seed + 1)
    results = relative_perplexity_decrease(
        load(model), calibration, held_out, parsed, samples, seed, batch_size, progress=True
    )
    if as_json:
        emit({"samples": samples, "schemes": [r.to_dict() for r in results]}, True)
        return
    print(f"{'scheme':<24} {'RPD':>8} {'mean PPL sorted':>16} {'mean PPL unsorted':>18}")
    for r in results:
        print(f"{r.scheme:<24} {r.rpd:>8.4f} {r.mean_perplexity_sorted:>16.2f} {r.mean_perplexity_unsorted:>18.2f}")
