"""The token batches a run's settings describe: packed training and held-out sequences of
--data (or the embedded text), or the --domains mixture with its reference losses; and the
frozen --teacher, checked before anything loads."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from anyshape.checkpoints import config_source, load, load_config, load_tokenizer
from anyshape.data.text import default_text
from anyshape.errors import AnyshapeError, CheckpointError, first_line
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama
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


def teacher_source(settings: TrainSettings) -> str | None:
    """The MODEL the frozen teacher is: the parent (--teacher parent) or --teacher's; None when
    the largest Shape teaches in place (--teacher largest)."""
    if settings.teacher == "largest":
        return None
    return settings.model if settings.teacher == "parent" else settings.teacher


def check_teacher(settings: TrainSettings, student: LlamaFamilyConfig) -> LlamaFamilyConfig | None:
    """The frozen teacher's config, read without its weights (None: no frozen teacher); refuses
    a teacher that does not exist, whose vocabulary is not the student's, or whose context is
    shorter than seq_len."""
    source = teacher_source(settings)
    if source is None or settings.teacher == "parent":
        return None if source is None else student
    try:
        config = load_config(source)
    except AnyshapeError as error:
        raise AnyshapeError(f"teacher {source}: {first_line(error)}") from None
    fix = "choose a teacher with the student's tokenizer, or --teacher parent"
    if config.vocab_size != student.vocab_size:
        raise AnyshapeError(
            f"the teacher {source} has a vocabulary of {config.vocab_size} tokens and the student {settings.model} "
            f"one of {student.vocab_size}: distillation compares their logits token by token; {fix}"
        )
    mine, theirs = _vocabulary(settings.model), _vocabulary(source)
    if mine is not None and theirs is not None and mine != theirs:
        raise AnyshapeError(
            f"the teacher {source}'s tokenizer numbers its tokens otherwise than the student's ({settings.model}): "
            f"distillation compares their logits token by token; {fix}"
        )
    if settings.seq_len > config.hf.max_position_embeddings:
        raise AnyshapeError(
            f"seq_len={settings.seq_len} is longer than the teacher {source}'s context of "
            f"{config.hf.max_position_embeddings} tokens; choose --seq-len {config.hf.max_position_embeddings} or "
            "less, or another teacher"
        )
    return config


def _vocabulary(ref: str) -> dict[str, int] | None:
    """MODEL's tokenizer's token -> id map when it loads cheaply (a folder's tokenizer files; not
    a GGUF file's, which converts), else None."""
    if config_source(ref).suffix == ".gguf":
        return None
    try:
        return load_tokenizer(ref).get_vocab()
    except CheckpointError:
        return None


def load_teacher(settings: TrainSettings, dtype: torch.dtype, device: torch.device) -> ElasticLlama | None:
    """The frozen teacher on `device` in `dtype`, without gradients, in eval mode (None: the
    largest Shape teaches in place). Loading it leaves the random number generator as it was."""
    source = teacher_source(settings)
    if source is None:
        return None
    with torch.random.fork_rng(devices=[]):
        return load(source, dtype=dtype).to(device).requires_grad_(False).eval()
