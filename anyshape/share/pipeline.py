"""`anyshape share` end to end: plan, stage 1 (warm-up), stage 2 (fine-tuning), compact folder.

    WORK/warmup/   the shared model after stage 1, in the compact format (a MODEL for every command)
    WORK/run/      stage 2: an `anyshape train` run of WORK/warmup that trains the recovery (the
                   compact loader freezes everything else) or, with finetune_weights, every
                   stored weight too (a shared one learns from both layers that read it); the
                   full Shape, next-token loss; the loop's checkpoints, exact resume, DDP
    OUT/           the final compact folder, written atomically; WORK is removed afterwards

An interrupted share keeps WORK; `resume` reuses a finished warm-up with the same settings and
continues the run from its last checkpoint (or, if OUT was written with the same settings before
the interruption, only removes WORK).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anyshape.checkpoints import load, load_config, load_tokenizer
from anyshape.data.text import default_text
from anyshape.errors import AnyshapeError
from anyshape.share.plan import SharingPlan
from anyshape.share.storage import SHARING_FILE, read_sharing, save_shared
from anyshape.share.tie import share_weights
from anyshape.share.warmup import record_layers, warm_up
from anyshape.train.checkpoint import CHECKPOINT, STATE
from anyshape.train.data import cached_token_ids, pack, split, tokenize_documents
from anyshape.train.distributed import Distributed
from anyshape.train.loop import train
from anyshape.train.run import iterate_metrics
from anyshape.train.settings import TrainSettings

SUMMARY = ("warmup", "val_ppl_before_finetune", "val_ppl_after_finetune")  # what share returns besides "out"


@dataclass(frozen=True)
class ShareSettings:
    """Everything a share depends on. Stage 2 trains with the `anyshape train` settings that
    `finetune_settings` derives from these."""

    model: str
    plan: SharingPlan
    out: str
    data: str | None = None  # as anyshape train's --data; None: the embedded default text
    val_data: str | None = None
    seq_len: int = 256
    warmup_steps: int = 200  # stage 1: Adam steps on the recorded layer inputs and outputs
    warmup_sequences: int = 64  # stage 1: sequences recorded (the last 10% held out)
    warmup_lr: float = 1e-3
    finetune_steps: int = 200  # stage 2: optimizer steps of the training loop (0: none)
    finetune_weights: bool = False  # stage 2: train every stored weight too, not only the recovery
    batch_size: int = 4
    lr: float = 5e-4
    save_every: int = 50
    precision: str = "auto"
    max_memory: str | None = None  # stage 2: as anyshape train's --max-memory
    seed: int = 0
    work: str | None = None  # None: OUT.work beside OUT

    @property
    def work_folder(self) -> Path:
        return Path(self.work if self.work is not None else f"{self.out}.work").absolute()

    def warmup_record(self) -> dict[str, Any]:
        """What the warm-up depends on, recorded in WORK/warmup/sharing.json."""
        fields = ("model", "data", "seq_len", "warmup_steps", "warmup_sequences", "warmup_lr", "seed")
        return {name: getattr(self, name) for name in fields} | {"plan": self.plan.to_dict()}

    def finetune_settings(self) -> TrainSettings:
        """Stage 2 as an `anyshape train` run: the grid has only the full Shape (fractions 1,
        no random Shapes), so every step is plain next-token training of what is trainable."""
        steps = max(1, self.finetune_steps)
        return TrainSettings(
            model=str(self.work_folder / "warmup"), data=self.data, val_data=self.val_data,
            out=str(self.work_folder / "run"), fractions=(1.0,), random_shapes=0, kd="none", adapter="full",
            all_weights=self.finetune_weights,
            steps=steps, seq_len=self.seq_len, batch_size=self.batch_size, lr=self.lr,
            warmup_steps=max(1, steps // 10), save_every=self.save_every, eval_every=steps, precision=self.precision,
            max_memory=self.max_memory, seed=self.seed,
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "plan": self.plan.to_dict()}


def share(
    settings: ShareSettings,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None,
    progress: bool = False,
) -> dict[str, Any]:
    """Runs the share that `settings` describe (continuing WORK with `resume`) and writes
    settings.out; returns a summary (per-layer warm-up errors, held-out perplexity before and
    after stage 2). Under torchrun every process calls it: rank 0 does stage 1 and writes."""
    settings.plan.validate(load_config(settings.model).num_hidden_layers)
    settings.finetune_settings().check()  # stage 2's options fail before stage 1 runs
    out, work = Path(settings.out), settings.work_folder
    world = Distributed.from_environment()
    if out.exists() and not overwrite:
        if resume and _written_with(out, settings):  # interrupted while removing WORK
            log(f"{out} is already written with these settings; nothing to do")
            if world.rank == 0:
                shutil.rmtree(work, ignore_errors=True)
            record = read_sharing(out)
            return {"out": str(out)} | {key: record[key] for key in SUMMARY}
        raise AnyshapeError(f"{out} already exists; choose another --out or pass --overwrite")
    owns_group = world.enabled and not torch.distributed.is_initialized()
    if owns_group:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        if world.rank == 0:
            _prepare_work(settings, work, resume, overwrite)
            fits = _stage_one(settings, work / "warmup", log, progress)
        if world.enabled:
            torch.distributed.barrier()
        run = _stage_two(settings, work / "run", resume, log, progress)
        if world.rank != 0:
            return {}
        final = load(run) if run is not None else load(work / "warmup")
        tokenizer = load_tokenizer(settings.model)
        history = [m["val_ppl"]["largest"] for m in iterate_metrics(run) if "val_ppl" in m] if run else []
        summary = {  # the keys of SUMMARY
            "warmup": fits,
            "val_ppl_before_finetune": history[0] if history else None,
            "val_ppl_after_finetune": history[-1] if history else None,
        }
        save_shared(
            final, settings.plan, out, tokenizer, settings.model, overwrite, {"settings": settings.to_dict()} | summary
        )
        shutil.rmtree(work)
        return {"out": str(out)} | summary
    except KeyboardInterrupt:
        log(f"interrupted; {work} keeps the finished stages: run the same command with --resume to continue")
        raise
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def _written_with(out: Path, settings: ShareSettings) -> bool:
    """Whether OUT is a compact folder that a share with `settings` wrote."""
    return (out / SHARING_FILE).is_file() and read_sharing(out).get("settings") == json.loads(
        json.dumps(settings.to_dict())
    )


def _prepare_work(settings: ShareSettings, work: Path, resume: bool, overwrite: bool) -> None:
    """Makes WORK ready: kept with `resume` (when its warm-up matches the settings), emptied with
    `overwrite`, refused otherwise."""
    warmup = work / "warmup"
    if resume and warmup.is_dir():
        recorded = read_sharing(warmup).get("record")
        if recorded != json.loads(json.dumps(settings.warmup_record())):
            raise AnyshapeError(
                f"{warmup} was warmed up with other settings; resume with the same options, or start over with "
                "--overwrite"
            )
    elif work.exists() and not resume:
        if not overwrite:
            raise AnyshapeError(
                f"{work} holds an interrupted share; continue it with --resume, or start over with --overwrite"
            )
        shutil.rmtree(work)


def _stage_one(settings: ShareSettings, folder: Path, log: Callable[[str], None], progress: bool) -> list[dict]:
    """The warm-up, written to `folder` in the compact format (or read back from it when a
    resumed share finished it before); returns the per-layer errors."""
    if folder.is_dir():
        log(f"stage 1: reusing the warm-up in {folder}")
        return read_sharing(folder)["warmup"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load(settings.model).to(device)
    tokenizer = load_tokenizer(settings.model)
    sequences = _warmup_sequences(settings, tokenizer)
    log(f"stage 1: recording layers {', '.join(map(str, settings.plan.replaced))} on {len(sequences)} sequences")
    records = record_layers(model, sequences, settings.plan.replaced, settings.batch_size)
    share_weights(model, settings.plan)
    fits = warm_up(
        model, records, settings.warmup_steps, settings.warmup_lr, settings.batch_size, seed=settings.seed,
        progress=progress,
    )  # fmt: skip
    fits = [fit.to_dict() for fit in fits]
    extra = {"record": settings.warmup_record(), "warmup": fits}
    save_shared(model.cpu(), settings.plan, folder, tokenizer, settings.model, extra=extra)
    return fits


def _stage_two(
    settings: ShareSettings, run: Path, resume: bool, log: Callable[[str], None], progress: bool
) -> Path | None:
    """Fine-tunes the recovery end to end on the next-token loss (None with no steps)."""
    if settings.finetune_steps == 0:
        return None
    continuing = resume and (run / CHECKPOINT / STATE).is_file()
    train(settings.finetune_settings(), resume=continuing, overwrite=not continuing, log=log, progress=progress)
    return run


def _warmup_sequences(settings: ShareSettings, tokenizer) -> torch.Tensor:
    """(n, seq_len) token ids for stage 1: a seeded draw of `warmup_sequences` of the windows
    stage 2 trains on (never its held-out ones)."""
    if settings.data is None:
        ids = tokenize_documents(tokenizer, [default_text()])
    else:
        cache = Path(os.environ.get("ANYSHAPE_CACHE", "~/.cache/anyshape")).expanduser() / "tokens"
        ids = cached_token_ids(tokenizer, settings.data, cache)
    windows = pack(ids, settings.seq_len)
    val_fraction = settings.finetune_settings().val_fraction
    train_windows = windows if settings.val_data is not None else split(windows, val_fraction, settings.seed).train
    order = torch.randperm(len(train_windows), generator=torch.Generator().manual_seed(settings.seed))
    return train_windows[order[: settings.warmup_sequences]]
