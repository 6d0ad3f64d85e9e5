"""Options shared by the commands that read calibration text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from torch import Tensor

from anyshape.checkpoints import load_tokenizer
from anyshape.data.calibration import calibration_ids
from anyshape.data.text import DEFAULT_TEXT_NAME, load_text

DataOpt = Annotated[
    Path | None,
    typer.Option(
        help=f'Calibration text: a .txt or .jsonl ("text" field) file. Default: {DEFAULT_TEXT_NAME}.',
        metavar="FILE",
        show_default=False,
    ),
]
NumSequencesOpt = Annotated[int, typer.Option(help="Calibration windows (sequences) to draw.", min=1)]
SequenceLengthOpt = Annotated[int, typer.Option(help="Tokens per calibration window.", min=2)]
SeedOpt = Annotated[int, typer.Option(help="Seed of the random window offsets.", min=-(2**63), max=2**64 - 1)]
BatchSizeOpt = Annotated[int, typer.Option(help="Sequences per forward pass.", min=1)]


def read_calibration(model: str, data: Path | None, num_sequences: int, sequence_length: int, seed: int) -> Tensor:
    """(num_sequences, sequence_length) token ids of the calibration text, tokenized by MODEL's
    tokenizer, at offsets drawn with `seed`."""
    text = load_text(data)
    return calibration_ids(load_tokenizer(model), text, num_sequences, sequence_length, seed)
