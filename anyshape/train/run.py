"""A run folder's bookkeeping: whether a run may start or resume there, its record of
settings (RUN/train.json), and its metrics log (RUN/metrics.jsonl, one JSON line per logged
step and per evaluation). The checkpoint itself is `train.checkpoint`'s."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from anyshape.errors import AnyshapeError
from anyshape.files import atomic_files, clear_leftovers
from anyshape.train.checkpoint import CHECKPOINT
from anyshape.train.distributed import Distributed
from anyshape.train.settings import RUN_FILE, TrainSettings, read_settings

METRICS = "metrics.jsonl"


def log_metrics(run: Path, world: Distributed, metrics: dict[str, Any]) -> None:
    if world.rank == 0:
        with (run / METRICS).open("a") as file:
            file.write(json.dumps(metrics) + "\n")


def check_destination(run: Path, settings: TrainSettings, resume: bool, overwrite: bool) -> None:
    """Raises AnyshapeError unless RUN can be resumed with `settings` (`resume`), or a new run
    can start there: RUN absent or empty, or `overwrite`."""
    record_path = run / RUN_FILE
    if resume:
        if not record_path.is_file():
            raise AnyshapeError(f"{run} is not a run folder (no {RUN_FILE}); start a new run without --resume")
        differences = read_settings(run).differences(settings)
        if differences:
            raise AnyshapeError(
                f"{run} was started with other settings ({'; '.join(differences)}); resume with the same "
                "settings, or start a new run in another --out"
            )
    elif run.exists() and any(run.iterdir()) and not overwrite:
        hint = f"continue it with --resume {run}, or " if record_path.is_file() else ""
        raise AnyshapeError(f"{run} already exists and is not empty; {hint}choose another --out or pass --overwrite")


def start_run(run: Path, settings: TrainSettings) -> None:
    """Writes RUN/train.json (atomically), replacing what an earlier run left there."""
    clear_leftovers(run / CHECKPOINT)
    shutil.rmtree(run / CHECKPOINT, ignore_errors=True)
    (run / METRICS).unlink(missing_ok=True)
    with atomic_files([run / RUN_FILE], overwrite=True) as (path,):
        path.write_text(json.dumps({"settings": settings.to_dict()}, indent=1))


def drop_later_metrics(run: Path, step: int) -> None:
    """Keeps RUN/metrics.jsonl up to `step`, the checkpoint's: a run killed after it logged the
    steps that the resumed run logs again, and maybe half a line."""
    path = run / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] > step:
                break
        except json.JSONDecodeError:  # the line a kill cut short
            break
        kept.append(line + "\n")
    with atomic_files([path], overwrite=True) as (tmp,):
        tmp.write_text("".join(kept))


def iterate_metrics(run: Path) -> Iterator[dict[str, Any]]:
    """The run's logged metrics, one dict per line of RUN/metrics.jsonl."""
    path = run / METRICS
    if path.is_file():
        for line in path.read_text().splitlines():
            yield json.loads(line)
