"""The token batches a run's settings describe: packed training and held-out sequences of
--data (or the embedded text), or the --domains mixture with its reference losses."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from anyshape.checkpoints import load, load_tokenizer
from anyshape.data.text import default_text
from anyshape.errors import AnyshapeError
from anyshape.shape import Shape
from anyshape.train.data import TrainingData, build_training_data, pack, split, tokenize_documents
from anyshape.train.distributed import Distributed
from anyshape.train.domains import (
    DomainMixture,
    build_domain_data,
    held_out_losses,
    parse_domains,
    read_reference_losses,
    reference_losses_from_model,
)
from anyshape.train.settings import TrainSettings


def training_data(settings: TrainSettings, context: int) -> TrainingData:
    """Packed training and held-out sequences of seq_len tokens, tokenised once into a cache."""
    check_context(settings, context)
    tokenizer = load_tokenizer(settings.model)
    cache = token_cache()
    if settings.data is None:
        ids = tokenize_documents(tokenizer, [default_text()])
        return split(pack(ids, settings.seq_len), settings.val_fraction, settings.seed)
    return build_training_data(
        tokenizer, settings.data, settings.seq_len, cache, settings.val_data, settings.val_fraction, settings.seed
    )


def domain_mixture(settings: TrainSettings, context: int, micro_batch: int) -> DomainMixture:
    """The --domains sources, tokenised once, packed and split, mixed by their token counts."""
    check_context(settings, context)
    data = build_domain_data(
        load_tokenizer(settings.model), parse_domains(settings.domains), settings.seq_len, token_cache(),
        settings.val_fraction, settings.seed,
    )  # fmt: skip
    return DomainMixture(data, micro_batch, settings.seed)


def mixed_held_out(mixture: DomainMixture, rows: int) -> Tensor:
    """(rows, S) held-out sequences for the perplexity log, an equal share from every domain."""
    share = -(-rows // len(mixture.names))
    return torch.cat([data.val[:share] for data in mixture.data.values()])[:rows]


def reference_losses(
    settings: TrainSettings, mixture: DomainMixture, autocast, device: torch.device
) -> dict[str, float]:
    """Each domain's reference loss: from the --reference-losses file, or the held-out losses of
    the --reference-model (the same held-out sequences every update measures)."""
    if settings.reference_losses is not None:
        return read_reference_losses(settings.reference_losses, mixture.names)
    with autocast():
        reference = load(settings.reference_model).to(device)
        return reference_losses_from_model(reference, mixture, settings.batch_size, held_out_rows(settings))


def domain_losses(
    model: nn.Module, mixture: DomainMixture, shape: Shape, settings: TrainSettings, world: Distributed, autocast
) -> dict[str, float]:
    """Held-out loss per domain of `shape`, rank 0's in every process (so all mix alike)."""
    with autocast():
        losses = held_out_losses(model, mixture, shape, settings.batch_size, held_out_rows(settings))
    if world.enabled:
        shared = [losses]
        torch.distributed.broadcast_object_list(shared, src=0)
        losses = shared[0]
    return losses


def held_out_rows(settings: TrainSettings) -> int:
    return settings.val_batches * settings.batch_size


def check_context(settings: TrainSettings, context: int) -> None:
    if settings.seq_len > context:
        raise AnyshapeError(
            f"seq_len={settings.seq_len} is longer than the model's context of {context} tokens; "
            f"choose --seq-len {context} or less"
        )


def token_cache() -> Path:
    return Path(os.environ.get("ANYSHAPE_CACHE", "~/.cache/anyshape")).expanduser() / "tokens"
