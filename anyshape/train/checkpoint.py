"""A run's checkpoint: written atomically, read back to resume exactly or to use the model.

    RUN/train.json                    settings, the parent and the search space (written at start)
    RUN/checkpoint/weights.safetensors  the trainable parameters (all of them, or the adapters)
    RUN/checkpoint/optimizer.pt       AdamW's state, keyed by parameter name (weights_only load)
    RUN/checkpoint/state.json         step, schedulers' and loss-balancer state
    RUN/checkpoint/NAME.safetensors, NAME_optimizer.pt   each companion module that trains beside
                                      the model: the budget router (--router), pruning masks
                                      and Lagrange multipliers (pruning)
    RUN/metrics.jsonl                 one line per logged step and per evaluation

The state dicts go through torch.distributed.checkpoint.state_dict, which gathers DDP and FSDP
models alike into plain, full, name-keyed tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from anyshape.errors import CheckpointError, first_line
from anyshape.files import atomic_directory
from anyshape.model.adapters import add_adapters
from anyshape.model.headers import FLOAT_DTYPES, check_finite, check_tensors, safetensors_header
from anyshape.model.llama import ElasticLlama
from anyshape.model.modulation import add_modulation
from anyshape.train.settings import TrainSettings

CHECKPOINT = "checkpoint"
WEIGHTS, OPTIMIZER, STATE = "weights.safetensors", "optimizer.pt", "state.json"
Companions = dict[str, tuple[nn.Module, torch.optim.Optimizer]]  # name -> (module, its optimizer)
DAMAGED = "the run's checkpoint is damaged; start the run again (--overwrite)"


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that train (of the model inside a DDP wrapper)."""
    model = getattr(model, "module", model)
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def save_checkpoint(
    run: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    companions: Companions | None = None,
) -> None:
    """Writes RUN/checkpoint/ (replacing the previous one only once complete). Every process of
    a distributed run calls it; rank 0 writes. `optimizer` is None when the model is frozen; the
    companions (replicated in every process) are saved as they are."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optimizer_state = get_state_dict(model, optimizer or (), options=options)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    names = trainable_names(model)
    weights = {name: tensor.contiguous() for name, tensor in model_state.items() if name in names}
    with atomic_directory(run / CHECKPOINT, overwrite=True) as folder:
        save_file(weights, folder / WEIGHTS)
        torch.save(optimizer_state, folder / OPTIMIZER)
        (folder / STATE).write_text(json.dumps(state, indent=1))
        for name, (module, module_optimizer) in (companions or {}).items():
            save_file({k: v.contiguous() for k, v in module.state_dict().items()}, folder / f"{name}.safetensors")
            torch.save(module_optimizer.state_dict(), folder / f"{name}_optimizer.pt")


def load_checkpoint(
    run: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    companions: Companions | None = None,
) -> dict[str, Any]:
    """Loads the trainable weights (and the optimizer's state) into `model`, and each
    companion's (and its optimizer's); returns state.json."""
    folder = run / CHECKPOINT
    if not (folder / STATE).is_file():
        raise CheckpointError(f"{run} has no finished checkpoint yet ({folder / STATE} is missing); start it again")
    inner = getattr(model, "module", model)
    shapes = {name: tuple(p.shape) for name, p in inner.named_parameters() if p.requires_grad}  # global under FSDP
    weights = read_checked(folder / WEIGHTS, shapes)
    missing = sorted(set(shapes) - set(weights))
    if missing:
        raise CheckpointError(
            f"{folder / WEIGHTS} lacks {len(missing)} trainable tensors, e.g. {missing[0]}; {DAMAGED}"
        )
    options = StateDictOptions(full_state_dict=True, strict=False)
    if optimizer is None:
        set_state_dict(model, (), model_state_dict=weights, optim_state_dict={}, options=options)
    else:
        optimizer_state = torch.load(folder / OPTIMIZER, weights_only=True)
        set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optimizer_state, options=options)
    for name, (module, module_optimizer) in (companions or {}).items():
        load_companion(run, name, module)
        module_optimizer.load_state_dict(torch.load(folder / f"{name}_optimizer.pt", weights_only=True))
    return json.loads((folder / STATE).read_text())


def read_checked(path: Path, shapes: dict[str, tuple[int, ...]], device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's safetensors file, its header checked first against `shapes`
    (float dtypes, these shapes, sizes within the file) and its values finite."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; {DAMAGED}")
    check_tensors(path, safetensors_header(path, DAMAGED), shapes, FLOAT_DTYPES, DAMAGED)
    try:
        tensors = load_file(path, device=device)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is corrupt ({first_line(error)}); {DAMAGED}") from None
    check_finite(path, tensors, DAMAGED)
    return tensors


def check_run(run: Path) -> None:
    """Checks the headers of RUN's checkpoint files (dtypes, sizes within each file), if it has one."""
    folder = run / CHECKPOINT
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else ():
        check_tensors(path, safetensors_header(path, DAMAGED), None, FLOAT_DTYPES, DAMAGED)


def load_companion(run: Path, name: str, module: nn.Module) -> nn.Module:
    """Loads RUN's checkpoint of the companion `name` into `module`; returns it."""
    path = run / CHECKPOINT / f"{name}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"{run} has no {name} in its checkpoint ({path} is missing)")
    state = module.state_dict()
    device = next(iter(state.values())).device
    module.load_state_dict(read_checked(path, {name: tuple(t.shape) for name, t in state.items()}, str(device)))
    return module


def add_trainable_modules(model: ElasticLlama, settings: TrainSettings, device: torch.device | None = None) -> None:
    """Adds what `settings` train besides (or instead of) the weights, and so what a run's
    checkpoint holds: adapters (on `device`, default the model's), modulation; with router_only
    the model's own weights are frozen, with all_weights every weight trains (a compact shared
    model's stored weights too, not only its recovery)."""
    if settings.all_weights:
        model.requires_grad_(True)
    add_adapters(
        model, settings.adapter, settings.lora_rank, settings.lora_alpha, settings.experts, settings.top_k,
        device=device,
    )  # fmt: skip
    if settings.router_only:
        model.requires_grad_(False)
    if settings.modulation:
        add_modulation(model)
