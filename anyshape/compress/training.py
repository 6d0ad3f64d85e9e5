"""The `train` stage of compress: one elastic run that every member of the family comes from.

The sorted parent trains as one elastic model: on every step the family's zero-shot Shapes,
the largest and the smallest Shape of the search space and a random grid Shape learn, on the
same batch, to match the logits of the frozen parent (forward KL). Sizes between the members
train too, so any Shape of the result can be extracted later. The run lives in a run folder
under the stages and resumes from its last checkpoint; the result is a plain Hugging Face
folder of the trained full model, its units still in the sorted order.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from anyshape.checkpoints import load
from anyshape.files import atomic_files
from anyshape.importance.scores import Scores
from anyshape.model.llama import ElasticLlama
from anyshape.shape import Shape
from anyshape.train.loop import train
from anyshape.train.run import iterate_metrics
from anyshape.train.settings import RUN_FILE, TrainSettings, read_settings

TRAIN_TEXT, HELD_OUT_TEXT = "train.txt", "held-out.txt"
KD = "forward-kl"  # the students match the parent's next-token distributions
RANDOM_SHAPES = 1  # random grid Shapes per step, besides largest, smallest and the members
EVALUATIONS = 4  # held-out perplexities logged over a run
CHECKPOINTS = 8  # checkpoints over a run: a kill loses at most an eighth of it


@dataclasses.dataclass(frozen=True)
class ElasticTraining:
    """How the family's one elastic run trains (part of compress's settings)."""

    tokens: int  # training tokens in all
    seq_len: int
    batch_size: int  # sequences per optimizer step
    lr: float  # peak; warmup over the first tenth, then cosine to a tenth of it
    random_shapes: int  # random grid Shapes per step, besides largest, smallest and the members
    kd: str
    seed: int

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.tokens / (self.batch_size * self.seq_len)))

    @property
    def trained_tokens(self) -> int:
        """`tokens` rounded up to whole steps."""
        return self.steps * self.batch_size * self.seq_len


def ranked_scores(scores: Scores, ranking: list[int]) -> Scores:
    """`scores` with layer scores that order the layers as `ranking` does (most important first),
    so that training's search space keeps the same layers at each depth as compress's."""
    layers = torch.empty(len(ranking))
    layers[torch.tensor(ranking)] = torch.arange(len(ranking), 0, -1, dtype=torch.float32)
    return dataclasses.replace(scores, layers=layers)


def write_texts(folder: Path, texts: dict[str, str]) -> None:
    """Writes each text file of `texts` (name -> text) into `folder`, all or none."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_files([folder / name for name in texts], overwrite=True) as paths:
        for path, text in zip(paths, texts.values(), strict=True):
            path.write_text(text)


def elastic_run_settings(
    training: ElasticTraining, parent: Path, texts: Path, run: Path, members: list[Shape], fractions, align: int
) -> TrainSettings:
    """The `anyshape train` settings of the family's elastic run (absolute paths)."""
    steps = training.steps
    return TrainSettings(
        model=str(parent),
        data=str(texts / TRAIN_TEXT),
        val_data=str(texts / HELD_OUT_TEXT),
        out=str(run),
        sampling="sandwich",
        random_shapes=training.random_shapes,
        shapes=tuple(shape.to_dict() for shape in members),
        fractions=tuple(fractions),
        align=align,
        kd=training.kd,
        teacher="parent",
        steps=steps,
        seq_len=training.seq_len,
        batch_size=training.batch_size,
        lr=training.lr,
        warmup_steps=max(1, steps // 10),
        val_batches=1,
        save_every=max(1, math.ceil(steps / CHECKPOINTS)),
        eval_every=max(1, math.ceil(steps / EVALUATIONS)),
        seed=training.seed,
    ).with_absolute_paths()


def train_elastic(
    settings: TrainSettings, log: Callable[[str], None]
) -> tuple[ElasticLlama, dict[str, dict[str, float]]]:
    """Runs the elastic run of `settings`, or resumes it from its last checkpoint (a run of other
    settings in its folder starts over); returns the trained model and the held-out perplexity of
    each validated Shape (largest, smallest, fixed-i: the members; teacher) before and after."""
    run = Path(settings.out)
    resume = (run / RUN_FILE).is_file() and not read_settings(run).differences(settings)
    tokens_per_step = settings.batch_size * settings.seq_len
    log(
        f"[train] {settings.steps * tokens_per_step:,} tokens: {settings.steps} steps of {settings.batch_size} x "
        f"{settings.seq_len}; students: largest, smallest, {len(settings.shapes)} members, {settings.random_shapes} "
        f"random; teacher: the parent, frozen ({settings.kd})"
    )
    train(settings, resume=resume, overwrite=True, log=log, progress=True, on_step=_eta(settings, log))
    evaluations = [metrics["val_ppl"] for metrics in iterate_metrics(run) if "val_ppl" in metrics]
    return load(run), {"before": evaluations[0], "after": evaluations[-1]}


def _eta(settings: TrainSettings, log: Callable[[str], None], measured: int = 3) -> Callable[[int], None]:
    """An on_step callback that says, once `measured` steps are done, the tokens per second they
    ran at and the time the rest of the run will take at that speed."""
    started: dict[str, float] = {}

    def on_step(step: int) -> None:
        if not started:
            started.update(step=step, time=time.perf_counter())  # the first step also warms up: not timed
        elif step - started["step"] == measured:
            seconds = (time.perf_counter() - started["time"]) / measured
            left = (settings.steps - step) * seconds
            log(
                f"[train] {settings.batch_size * settings.seq_len / seconds:,.0f} tokens/s over {measured} steps; "
                f"about {_duration(left)} for the remaining {settings.steps - step} steps"
            )

    return on_step


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
