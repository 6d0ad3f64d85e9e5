"""Calibration batches: fixed-length token windows at seeded random offsets of a text."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import DataError
from anyshape.memory import check_allocation

NUM_SEQUENCES = 32
SEQUENCE_LENGTH = 512
SEED = 0


def calibration_ids(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    num_sequences: int = NUM_SEQUENCES,
    sequence_length: int = SEQUENCE_LENGTH,
    seed: int = SEED,
) -> Tensor:
    """(num_sequences, sequence_length) token ids: windows of the tokenized text (no special
    tokens) starting at offsets drawn uniformly with `torch.Generator().manual_seed(seed)`."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return random_windows(ids, num_sequences, sequence_length, seed)


def random_windows(ids: Tensor, num_sequences: int, sequence_length: int, seed: int = SEED) -> Tensor:
    """(num_sequences, sequence_length) windows of token ids (N,) at offsets drawn uniformly
    with `torch.Generator().manual_seed(seed)`."""
    if num_sequences < 1 or sequence_length < 2:
        raise DataError(f"need at least 1 sequence of at least 2 tokens, got {num_sequences} x {sequence_length}")
    if len(ids) < sequence_length:
        raise DataError(
            f"the calibration text has {len(ids)} tokens, fewer than one sequence of {sequence_length}; "
            "give more text or a smaller --sequence-length"
        )
    check_allocation(
        num_sequences * (sequence_length + 1) * 8,
        f"{num_sequences:,} windows of {sequence_length:,} tokens",
        "draw fewer with --num-sequences",
    )
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(ids) - sequence_length + 1, (num_sequences,), generator=generator)
    return torch.stack([ids[offset : offset + sequence_length] for offset in offsets.tolist()])
