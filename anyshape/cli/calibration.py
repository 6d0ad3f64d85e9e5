"""Calibration text, as the commands that read it take it (their options: anyshape.cli.options)."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from anyshape.checkpoints import load_tokenizer
from anyshape.data.calibration import calibration_ids
from anyshape.data.text import load_text


def read_calibration(model: str, data: Path | None, num_sequences: int, sequence_length: int, seed: int) -> Tensor:
    """(num_sequences, sequence_length) token ids of the calibration text, tokenized by MODEL's
    tokenizer, at offsets drawn with `seed`."""
    text = load_text(data)
    return calibration_ids(load_tokenizer(model), text, num_sequences, sequence_length, seed)
