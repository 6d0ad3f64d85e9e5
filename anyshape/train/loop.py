"""One-for-all elastic training: every step trains the sampled Shapes on the same batch.

Per optimizer step and accumulation micro-batch (x, (b, S) token ids):
  1. the largest Shape's logits t = f(x; largest), without gradients: the in-place teacher;
  2. each smaller Shape k: loss_k = KD(f(x; k), t) (or next-token loss with kd none), scaled
     by the loss balancer, backward (gradients accumulate in the shared weights);
  3. the largest Shape: loss = next-token loss, backward.
With a frozen teacher (--teacher parent or MODEL: loaded once, no gradients) t is its logits
instead, and the largest Shape is a student like the others in step 3: KD(f(x; largest), t).
Then gradient clipping, AdamW, and the warmup + cosine learning rate; a step whose loss or
gradient is NaN or inf is skipped (said in the log) or, with on_nonfinite stop, ends the run
with an error naming the step, after a checkpoint of the steps before it. Under DDP the smaller
Shapes' backward passes run in `no_sync()` and the largest's last, so gradients are all-reduced
once per step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from anyshape.checkpoints import kind_of, load, load_config, resolve
from anyshape.errors import AnyshapeError
from anyshape.files import clear_leftovers
from anyshape.importance.scores import scores_beside
from anyshape.memory import (
    GiB,
    MemoryEstimate,
    available_memory,
    check_memory,
    parse_size,
    runtime_bytes,
    training_memory,
)
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama
from anyshape.model.load import RowReader, row_reader
from anyshape.model.nll import mean_nll, next_token_loss, next_token_nll
from anyshape.search.space import SearchSpace
from anyshape.shape import Shape
from anyshape.train.checkpoint import CHECKPOINT, STATE, add_trainable_modules, load_checkpoint, save_checkpoint
from anyshape.train.controller import Controller, ControllerFactory, Student
from anyshape.train.data import Batches, shard
from anyshape.train.distill import LossBalancer, distillation_head_loss
from anyshape.train.distributed import (
    Distributed,
    average_over_processes,
    barrier,
    device_for,
    fill_shards,
    mean_over_processes,
    no_sync,
    process_group,
    wrap,
)
from anyshape.train.domains import DomainMixture
from anyshape.train.inputs import (
    check_teacher,
    domain_losses,
    domain_mixture,
    load_teacher,
    mixed_held_out,
    reference_losses,
    training_data,
)
from anyshape.train.run import check_destination, drop_later_metrics, log_metrics, start_run
from anyshape.train.sampling import ShapeSampler
from anyshape.train.settings import TrainSettings
from anyshape.train.timing import SlotTimer

TEACHER_SLOT = "teacher"  # a frozen teacher's next-token loss and perplexity in the metrics


def learning_rate_factor(step: int, warmup: int, total: int, floor: float) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to `floor` at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def training_space(settings: TrainSettings, config: LlamaFamilyConfig) -> SearchSpace:
    """The Shapes training covers: the grid of `fractions`, depth keeping the best layers by the
    scores beside the model when there are some, else the first ones."""
    scores = scores_beside(resolve(settings.model), config)
    ranking = scores.layers.argsort(descending=True, stable=True).tolist() if scores is not None else None
    return SearchSpace.from_fractions(config, settings.fractions, ranking, settings.align)


def train(
    settings: TrainSettings,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None,
    progress: bool = False,
    on_step: Callable[[int], None] | None = None,
    controller: ControllerFactory | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Runs (or, with `resume`, continues) the training that `settings` describe in
    `settings.out`; returns the last logged metrics. With `dry_run`, logs the memory plan of a
    step and returns it ({"memory": bytes per part, "allowed": bytes}) without training or
    writing anything (nor reading a Hugging Face or GGUF model's weights). `on_step(step)` runs after each finished
    optimizer step (steps count from 1). `controller` makes the learned students of settings
    that have them (`anyshape.router.control.RouterControl` for `router`,
    `anyshape.prune.control.PruningControl` for `prune_target`); without one the sampler
    chooses them. A KeyboardInterrupt saves a checkpoint of the last finished step before it
    propagates."""
    settings.check()
    learned = "router" if settings.router else "prune_target" if settings.prune_target is not None else None
    if learned is not None and controller is None:
        raise AnyshapeError(f"settings with {learned} learn their students: pass the controller that learns them")
    run = Path(settings.out)
    world = Distributed.from_environment()
    device = device_for(world)
    with process_group(world, device):
        return _train(settings, run, world, device, resume, overwrite, log, progress, on_step, controller, dry_run)


def _train(
    settings: TrainSettings,
    run: Path,
    world: Distributed,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    log: Callable[[str], None],
    progress: bool,
    on_step: Callable[[int], None] | None,
    controller: ControllerFactory | None,
    dry_run: bool,
) -> dict[str, Any]:
    if not dry_run:
        check_destination(run, settings, resume, overwrite)
    torch.manual_seed(settings.seed)  # the adapters' initialisation

    micro_batch = settings.batch_size // settings.grad_accum
    if micro_batch % world.world_size:
        raise AnyshapeError(
            f"batch_size / grad_accum = {micro_batch} sequences must split evenly over {world.world_size} processes; "
            "choose a batch size that is a multiple of grad_accum x the number of processes"
        )
    student = load_config(settings.model)
    teacher_config = check_teacher(settings, student)  # a bad --teacher fails before anything loads
    context = student.hf.max_position_embeddings
    if settings.domains is not None:  # bad data fails fast, before the model loads
        mixture = domain_mixture(settings, context, micro_batch)
        batches, val = mixture, mixed_held_out(mixture, settings.val_batches * settings.batch_size)
    else:
        data = training_data(settings, context)
        mixture, batches, val = None, Batches(data.train, micro_batch, settings.seed), data.val
    rows = _sharded_rows(settings, world)
    loaded = rows is None and not (dry_run and kind_of(resolve(settings.model)) is None)
    if loaded:
        model = load(settings.model).to(device)
    else:  # built empty: a dry run counts its parameters; under FSDP each process then reads only its shard
        with torch.device("meta"):
            model = ElasticLlama(student).eval()
    bare = copy.deepcopy(model) if rows is not None and settings.adapter != "full" else None  # on meta: no memory
    model.checkpoint_layers = settings.activation_checkpointing
    if settings.compile:
        for layer in model.model.layers:
            layer.compile(dynamic=True)
    space = training_space(settings, model.config)
    sampler = ShapeSampler(
        space, settings.sampling, settings.random_shapes, [Shape.from_dict(s, model.config) for s in settings.shapes],
        settings.seed,
    )  # fmt: skip
    random_state = torch.get_rng_state()
    add_trainable_modules(model, settings)
    if bare is not None:
        rows = _with_first_adapters(rows, bare, settings, random_state)
    control = controller(settings, space, device) if controller is not None else None
    bf16 = _bf16(settings.precision, device)
    sequences = micro_batch // world.world_size
    estimate = _memory_estimate(model, settings, sequences, device, loaded, teacher_config, bf16, world.world_size)
    if settings.max_memory is not None:
        limit = parse_size(settings.max_memory)
    else:  # what is free, and what the process holds already: the loaded model (if it is), the runtime
        limit = available_memory(device) + (estimate.weights if loaded else 0) + estimate.runtime
    what = f"a training step of {sequences} x {settings.seq_len} tokens on {device.type}"
    if dry_run:
        log(f"{what} needs about {estimate.describe()}; {limit / GiB:.1f} GiB allowed")
        return {"memory": estimate.parts() | {"total": estimate.total}, "allowed": limit}
    fix = (
        "lower --batch-size or raise --grad-accum (fewer sequences per pass), shorten --seq-len, or train an "
        "adapter (--adapter lora); pass a larger --max-memory if the estimate is too cautious"
    )
    check_memory(estimate, limit, what, fix)
    teacher = load_teacher(settings, torch.bfloat16 if bf16 else torch.float32, device)  # None: the largest teaches
    companions = control.companions if control is not None else {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped = wrap(model, device, world, settings.distributed, settings.adapter != "full") if trainable else model
    if rows is not None:
        fill_shards(model, rows, device)
    trainable = [p for p in wrapped.parameters() if p.requires_grad]  # after wrapping: FSDP swaps in sharded ones
    fused = not (world.enabled and settings.distributed == "fsdp")  # one kernel per step, on the CPU too
    optimizer = (
        torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay, fused=fused)
        if trainable
        else None  # router_only: the model is frozen
    )
    optimizers = [o for o in (optimizer, *(o for _, o in companions.values())) if o is not None]
    schedules = []  # the model's learning rate; the companions' (router, masks, multipliers) stays constant
    if optimizer is not None:
        schedules.append(
            torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda step: learning_rate_factor(step, settings.warmup_steps, settings.steps, settings.min_lr_ratio),
            )
        )
    balancer = LossBalancer()
    autocast = _autocast(settings.precision, device)
    reference = reference_losses(settings, mixture, autocast, device) if settings.dynamic_batch else None

    barrier(world)  # every process has checked its inputs before rank 0 writes
    if world.rank == 0:
        if resume:  # a save killed between its two renames left the checkpoint aside: put it back
            clear_leftovers(run / CHECKPOINT)
        if not resume or not (run / CHECKPOINT / STATE).is_file():
            start_run(run, settings)  # only now: bad input leaves no run folder behind
    barrier(world)
    if resume and not (run / CHECKPOINT / STATE).is_file():
        log(f"{run} was stopped before its first checkpoint; starting it again from step 0")
        resume = False
    step = 0
    if resume:
        state = load_checkpoint(run, wrapped, optimizer, companions)
        step = state["step"]
        if world.rank == 0:
            drop_later_metrics(run, step)
        for schedule, schedule_state in zip(schedules, state["schedules"], strict=True):
            schedule.load_state_dict(schedule_state)
        balancer.load_state_dict(state["balancer"])
        if mixture is not None:
            mixture.load_state_dict(state["domains"])
        log(f"resuming {run} at step {step} of {settings.steps}")

    def checkpoint() -> None:
        save_checkpoint(
            run, wrapped, optimizer,
            {"step": step, "schedules": [s.state_dict() for s in schedules], "balancer": balancer.state_dict()}
            | ({"domains": mixture.state_dict()} if mixture is not None else {}),
            companions,
        )  # fmt: skip

    metrics: dict[str, Any] = {}
    bar = _progress(progress and world.rank == 0, settings.steps, step)
    saved = step

    def validate() -> dict[str, float]:
        return _validate(model, val, _validation_shapes(sampler, control), settings, autocast)

    if step == 0:  # the zero-shot baseline every later evaluation compares with, and the frozen teacher's
        target = {TEACHER_SLOT: _perplexity(teacher, val, settings, autocast)} if teacher is not None else {}
        log_metrics(run, world, {"step": 0, "val_ppl": validate() | target})
    try:
        while step < settings.steps:
            started = time.perf_counter()
            sampled_largest, students = _students(sampler, control, step)
            largest = sampled_largest[1]
            largest_learns = bool(trainable) and (control is None or control.largest_learns)
            timer = SlotTimer(device)
            on_device = _step(
                wrapped, sampled_largest, students, batches, step, settings, world, device, autocast, balancer,
                largest_learns, timer, teacher,
            )  # fmt: skip
            norms = [_clip(trainable, settings.max_grad_norm, device)]
            for module, _ in companions.values():
                average_over_processes(module, world)
                norms.append(_clip(list(module.parameters()), settings.max_grad_norm, device))
            losses, norms = _read(on_device, norms)
            norm, problem = norms[0], _nonfinite(losses, norms)
            skipped = problem is not None
            if skipped and settings.on_nonfinite == "stop":
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                if step > saved:
                    checkpoint()
                then = (
                    f"its checkpoint holds step {step}: resume it skipping such steps (anyshape train --resume "
                    f"{run} --on-nonfinite skip), or start again"
                    if step
                    else "start it again (--overwrite) skipping such steps (--on-nonfinite skip)"
                )
                raise AnyshapeError(
                    f"step {step + 1}: {problem}, and on_nonfinite is stop, so the run stopped; {then}, or with a "
                    "lower learning rate or other data"
                )
            if skipped:
                log(f"step {step + 1}: {problem}; the step is skipped")
            for o in optimizers:
                if not skipped:
                    o.step()
                o.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # after a skipped step torch warns that the optimizer did not step
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
                for schedule in schedules:
                    schedule.step()
            step += 1
            tokens = settings.batch_size * settings.seq_len
            metrics = {
                "step": step,
                "lr": schedules[0].get_last_lr()[0] if schedules else None,  # the model's
                "loss": losses,
                "grad_norm": norm,
                "skipped": skipped,
                "seconds": time.perf_counter() - started,
                "tokens_per_s": {slot: tokens / s for slot, s in timer.seconds().items() if s > 0},
            }
            if control is not None:
                metrics.update(control.metrics(step))
            if settings.dynamic_batch and step % settings.domain_update_every == 0:
                shape = control.trained_shape(largest) if control is not None else largest
                held_out = domain_losses(model, mixture, shape, settings, world, autocast)
                weights = mixture.update(held_out, reference, batch=step * settings.grad_accum)
                metrics["domains"] = {"loss": held_out, "reference": reference, "weights": weights}
            if step % settings.eval_every == 0 or step == settings.steps:
                metrics["val_ppl"] = validate()
            if step % settings.log_every == 0 or "val_ppl" in metrics:
                log_metrics(run, world, metrics)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({slot: f"{value:.3g}" for slot, value in losses.items()})
            if step % settings.save_every == 0 or step == settings.steps:
                checkpoint()
                saved = step
            if on_step is not None:
                on_step(step)
    except KeyboardInterrupt:
        if step > saved:
            checkpoint()
        log(f"interrupted at step {step}; continue with: anyshape train --resume {run}")
        raise
    finally:
        if bar is not None:
            bar.close()
    return metrics


def _read(losses: dict[str, Tensor], norms: list[Tensor]) -> tuple[dict[str, float], list[float]]:
    """A step's losses and gradient norms (0-d tensors on the device) as numbers: the step's one
    read from the device, so the host waits for it once, as a plain loop logging its loss does."""
    values = torch.stack([*losses.values(), *norms]).tolist()
    return dict(zip(losses, values[: len(losses)], strict=True)), values[len(losses) :]


def _nonfinite(losses: dict[str, float], norms: list[float]) -> str | None:
    """What is NaN or inf in a step (the loss of which Shapes, the gradient), or None."""
    slots = [slot for slot, value in losses.items() if not math.isfinite(value)]
    problems = [f"the loss of {', '.join(slots)} is not finite"] if slots else []
    if not all(math.isfinite(n) for n in norms):
        problems.append("the gradient is not finite")
    return " and ".join(problems) or None


def _step(
    model: nn.Module,
    largest_shape: tuple[str, Shape],
    students: Callable[[int], list[Student]],
    batches: Batches | DomainMixture,
    step: int,
    settings: TrainSettings,
    world: Distributed,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    balancer: LossBalancer,
    largest_learns: bool,
    timer: SlotTimer,
    frozen: nn.Module | None = None,
) -> dict[str, Tensor]:
    """Accumulates one optimizer step's gradients; returns the mean loss per slot (0-d tensors
    on the device, not read: the step reads them once, in `_read`) and times each slot's forward +
    backward in `timer`. `students(micro)` gives each micro-batch's smaller Shapes; the
    largest Shape learns if `largest_learns`, its backward last (the one that synchronises
    gradients under DDP); else the last micro-batch's last student's does. The teacher is the
    largest Shape in place, or the `frozen` model: then the largest learns from it like the
    others, and its next-token loss (slot "teacher") is the loss balancer's reference."""
    largest_slot, largest = largest_shape
    reference = largest_slot if frozen is None else TEACHER_SLOT  # the slot whose loss balancing aims at
    reads = settings.kd != "none" or settings.balance_losses  # whether anything reads the teacher's logits
    zero = torch.zeros((), device=device)
    losses: dict[str, Tensor] = {largest_slot: zero} if largest_learns or frozen is None else {}
    for micro in range(settings.grad_accum):
        ids = _to_device(shard(batches.batch(step * settings.grad_accum + micro), world.rank, world.world_size), device)
        micro_students = students(micro)
        teacher = None  # the teacher's logits (b, S, V): computed only when something reads them
        if frozen is None:
            needed = not largest_learns or (micro_students and reads)
        else:
            needed = reads and (largest_learns or bool(micro_students))
        if needed:
            with torch.no_grad(), autocast():
                teacher = model(ids, shape=largest) if frozen is None else frozen(ids)
            teacher_value = mean_over_processes(next_token_nll(teacher, ids), world)
            if settings.balance_losses:
                balancer.update(reference, teacher_value.item())  # the reference: updated first
            if frozen is not None or not largest_learns:
                losses[reference] = losses.get(reference, zero) + teacher_value / settings.grad_accum
        last = micro == settings.grad_accum - 1
        for index, student in enumerate(micro_students):
            synchronise = last and not largest_learns and index == len(micro_students) - 1
            with timer.span(student.slot), contextlib.nullcontext() if synchronise else no_sync(model), autocast():
                objective = (
                    next_token_loss(ids) if settings.kd == "none" else distillation_head_loss(settings.kd, teacher)
                )
                loss = model(ids, shape=student.shape, loss=objective)
                value = mean_over_processes(loss.detach(), world)
                if settings.balance_losses:
                    balancer.update(student.slot, value.item())
                scale = balancer.scale(student.slot) if settings.balance_losses else 1.0
                ((loss * scale + student.penalty) / settings.grad_accum).backward()
            losses[student.slot] = losses.get(student.slot, zero) + value / settings.grad_accum
        if not largest_learns:
            continue
        with timer.span(largest_slot), contextlib.nullcontext() if last else no_sync(model), autocast():
            if frozen is None or settings.kd == "none":
                objective = next_token_loss(ids)
            else:
                objective = distillation_head_loss(settings.kd, teacher)
            loss = model(ids, shape=largest, loss=objective)
            value = mean_over_processes(loss.detach(), world)
            if frozen is not None and settings.balance_losses:  # in place, the largest is the reference itself
                balancer.update(largest_slot, value.item())
                loss = loss * balancer.scale(largest_slot)
            (loss / settings.grad_accum).backward()
        losses[largest_slot] = losses[largest_slot] + value / settings.grad_accum
    return losses


def _students(
    sampler: ShapeSampler, control: Controller | None, step: int
) -> tuple[tuple[str, Shape], Callable[[int], list[Student]]]:
    """The step's largest Shape (slot, Shape) and its students per micro-batch: the sampler's
    Shapes, or the controller's (router or pruning masks)."""
    teacher, *sampled = sampler.shapes(step)
    if control is None:
        return teacher, lambda micro: [Student(slot, shape) for slot, shape in sampled]
    return teacher, lambda micro: control.students(step, micro)


def _validation_shapes(sampler: ShapeSampler, control: Controller | None) -> dict[str, Shape]:
    """The Shapes every evaluation reports: largest, smallest, the fixed ones, and the
    controller's (the router's Shape at each anchor, or the pruned sub-network)."""
    shapes = {"largest": sampler.space.largest(), "smallest": sampler.space.smallest()}
    shapes.update({f"fixed-{i}": shape for i, shape in enumerate(sampler.fixed)})
    if control is not None:
        shapes.update(control.validation_shapes())
    return shapes


@torch.no_grad()
def _validate(
    model: nn.Module, val: Tensor, shapes: dict[str, Shape], settings: TrainSettings, autocast
) -> dict[str, float]:
    """Perplexity of each of `shapes` on the first `val_batches` x batch_size held-out sequences."""
    rows = val[: settings.val_batches * settings.batch_size].to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    with autocast():
        result = {slot: math.exp(mean_nll(model, rows, shape, settings.batch_size)) for slot, shape in shapes.items()}
    model.train(was_training)
    return result


@torch.no_grad()
def _perplexity(model: nn.Module, val: Tensor, settings: TrainSettings, autocast) -> float:
    """Perplexity of the whole of `model` (the frozen teacher) on the held-out sequences `_validate` scores."""
    rows = val[: settings.val_batches * settings.batch_size].to(next(model.parameters()).device)
    with autocast():
        return math.exp(mean_nll(model, rows, None, settings.batch_size))


def _sharded_rows(settings: TrainSettings, world: Distributed) -> RowReader | None:
    """What reads each FSDP process's rows of MODEL's weights, where a run can load them so: a
    Hugging Face folder of safetensors, its weights or adapters trained (not modulation, a router
    or pruning masks, whose initial values come from the whole model's initialisation)."""
    plain = not (settings.modulation or settings.router or settings.router_only)
    if not (world.enabled and settings.distributed == "fsdp" and plain and settings.prune_target is None):
        return None
    path = resolve(settings.model)
    return row_reader(path) if kind_of(path) is None else None


def _with_first_adapters(
    rows: RowReader, bare: ElasticLlama, settings: TrainSettings, random_state: Tensor
) -> RowReader:
    """`rows`, and the rows of the adapters as one process holding the whole model first draws
    them, from `random_state` (the generator's when they were added). Adapters are small: each
    process makes them whole on the CPU, on `bare`, the model built on the meta device."""
    torch.set_rng_state(random_state)
    add_trainable_modules(bare, settings, device=torch.device("cpu"))
    first = {name: p.detach() for name, p in bare.named_parameters() if not p.is_meta}
    return lambda name, start, stop: first[name][start:stop] if name in first else rows(name, start, stop)


def _memory_estimate(
    model: ElasticLlama,
    settings: TrainSettings,
    sequences: int,
    device: torch.device,
    loaded: bool,
    teacher: LlamaFamilyConfig | None = None,
    bf16: bool = False,
    world_size: int = 1,
) -> MemoryEstimate:
    """The estimated peak (anyshape.memory) of a step of `sequences` per process, before the
    first batch, in one of `world_size` processes, the model's weights `loaded` already or not. A
    frozen `teacher` (its config: it loads after this) counts in bfloat16 when `bf16`, else
    float32."""
    several = settings.sampling != "largest" or settings.router or settings.prune_target is not None  # Shapes a step
    reads = settings.kd != "none" or settings.balance_losses  # whether the smaller Shapes read a teacher's logits
    held = sum(p.numel() * p.element_size() for p in model.parameters()) if loaded else 0
    return training_memory(
        model.config, model.full_shape, sequences, settings.seq_len,
        sum(p.numel() for p in model.parameters()), sum(p.numel() for p in model.parameters() if p.requires_grad),
        adapter=settings.adapter, rank=settings.lora_rank, top_k=settings.top_k,
        teacher_parameters=Shape.full(teacher).num_parameters(teacher) if teacher is not None else 0,
        teacher_bytes_per_value=2 if bf16 else 4, checkpointing=settings.activation_checkpointing,
        autocast_bytes=2 if bf16 else 4, teacher_logits=reads and (several or teacher is not None),
        accumulates=several or settings.grad_accum > 1,
        shards=world_size if settings.distributed == "fsdp" else 1,
        runtime=runtime_bytes(device, held),
    )  # fmt: skip


def _clip(parameters: list[Tensor], max_norm: float, device: torch.device) -> Tensor:
    """Clips the gradients' total norm to `max_norm` (0: no clipping); returns the norm before
    (a 0-d tensor on `device`)."""
    if not parameters:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor


def _to_device(ids: Tensor, device: torch.device) -> Tensor:
    """`ids` on `device`; to a GPU through pinned memory, a copy that does not wait for the device."""
    if device.type != "cuda":
        return ids.to(device)
    return ids.pin_memory().to(device, non_blocking=True)


def _bf16(precision: str, device: torch.device) -> bool:
    """Whether the run autocasts to bfloat16."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def _autocast(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if not _bf16(precision, device):
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _progress(enabled: bool, total: int, done: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step")
