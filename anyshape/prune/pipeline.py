"""Targeted structured pruning end to end: the masks learn on the training loop, then the
model is cut to the target exactly.

    OUT/run/     a training run (`anyshape train`'s loop, settings with `prune_target`): the
                 hard-concrete masks, the Lagrange multipliers and the model train together;
                 checkpoints, --resume, torchrun as for any run
    OUT/model/   the target model: the top units by mask score kept in every layer (the model
                 sorted so they come first), exported as a standard Hugging Face folder
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from anyshape.checkpoints import load_run, load_tokenizer
from anyshape.prune.control import PruningControl
from anyshape.prune.finalize import finalize
from anyshape.prune.masks import PruningMasks
from anyshape.prune.target import PruningTarget
from anyshape.shape import Shape
from anyshape.train.checkpoint import load_companion
from anyshape.train.loop import train
from anyshape.train.settings import TrainSettings

RUN, MODEL = "run", "model"


def prune(
    settings: TrainSettings,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None,
    progress: bool = False,
) -> tuple[Path, Shape] | None:
    """Prunes `settings.model` to `settings.prune_target`; returns OUT/model and its Shape of
    the parent (None in the processes of a torchrun launch other than rank 0)."""
    out = Path(out)
    run = out / RUN
    train(
        replace(settings, out=str(run)), resume=resume, overwrite=overwrite, log=log, progress=progress,
        controller=PruningControl,
    )  # fmt: skip
    if os.environ.get("RANK", "0") != "0":
        return None
    model = load_run(run)
    masks = load_companion(run, "masks", PruningMasks(model.config))
    target = PruningTarget.from_dict(dict(settings.prune_target), model.config)
    tokenizer = load_tokenizer(settings.model)
    return finalize(model, masks, target, out / MODEL, tokenizer=tokenizer, parent=settings.model, overwrite=True)
