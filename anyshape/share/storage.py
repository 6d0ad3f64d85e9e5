"""The compact format of a shared model: each tensor stored once, plus the recovery factors.

    OUT/config.json         the parent's config (the model every layer computes at full size)
    OUT/sharing.json        the plan: which layer reads which layer's weights, the recovery
                            kind and rank, the parent, and the warm-up's per-layer errors
    OUT/model.safetensors   every tensor of the model once: a replaced projection's weight is
                            not stored (it is its reference's), its recovery factors are
                            (`model.layers.11.mlp.up_proj.adapter.lora_A`, ...)
    OUT/tokenizer files     the parent's

`load_shared` builds the ElasticLlama with the plan applied, then loads the stored tensors: a
replaced projection gets its reference's Parameter itself, so no duplicated weight is ever
materialised. `anyshape.checkpoints.load` (and so every command) reads such a folder; `extract` merges the
recovery into plain weights.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import CheckpointError, first_line
from anyshape.files import atomic_directory
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.headers import check_finite, check_tensors, safetensors_header
from anyshape.model.llama import ElasticLlama
from anyshape.model.load import load_hf_config
from anyshape.shape import Shape
from anyshape.share.plan import COMPONENTS, SharingPlan
from anyshape.share.tie import freeze_all_but_recovery, share_weights, tie

SHARING_FILE = "sharing.json"  # marks a folder `anyshape share` wrote: each weight stored once

FORMAT = 1
WEIGHTS = "model.safetensors"
REWRITE = "write the folder again (anyshape share)"


def replaced_names(plan: SharingPlan) -> set[str]:
    """State-dict names of the weights that replaced layers read from their references."""
    return {
        f"model.layers.{layer}.{'mlp' if name in COMPONENTS['mlp'] else 'self_attn'}.{name}.weight"
        for layer in plan.replaced
        for name in plan.projections
    }


def stored_state_dict(model: ElasticLlama, plan: SharingPlan) -> dict[str, Tensor]:
    """What the compact file holds: the state dict less the replaced weights and a tied LM head."""
    skip = replaced_names(plan) | ({"lm_head.weight"} if model.config.tie_word_embeddings else set())
    return {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name not in skip}


def save_shared(
    model: ElasticLlama,
    plan: SharingPlan,
    out: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    parent: str = "",
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes `model` (with `plan` applied) to `out` in the compact format, atomically; `extra`
    adds entries to sharing.json."""
    if model.config.hf is None:
        raise CheckpointError("the model has no transformers config to save; load it with anyshape.load")
    tensors = stored_state_dict(model, plan)
    config = copy.deepcopy(model.config.hf)
    config.dtype = next(iter(tensors.values())).dtype
    record = {"format": FORMAT, "parent": parent, "plan": plan.to_dict(), **(extra or {})}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / SHARING_FILE).write_text(json.dumps(record, indent=1))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


def read_sharing(folder: str | Path) -> dict[str, Any]:
    """sharing.json of a compact folder, its "plan" as a SharingPlan."""
    path = Path(folder) / SHARING_FILE
    try:
        record = json.loads(path.read_text())
        record["plan"] = SharingPlan.from_dict(record["plan"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path} is unreadable ({first_line(error)}); write the folder again") from None
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {record.get('format')!r}; this anyshape reads format {FORMAT}")
    return record


def load_shared(folder: str | Path, dtype: torch.dtype = torch.float32) -> ElasticLlama:
    """The shared model of a compact folder, on CPU: replaced projections hold their reference's
    Parameter, recovery parameters train, everything else is frozen."""
    folder = Path(folder)
    model, plan = _checked(folder)
    try:
        tensors = load_file(folder / WEIGHTS)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{folder / WEIGHTS} is corrupt or missing ({first_line(error)}); {REWRITE}") from None
    check_finite(folder / WEIGHTS, tensors, REWRITE)
    model.load_state_dict({name: tensor.to(dtype) for name, tensor in tensors.items()}, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    tie(model, plan)
    freeze_all_but_recovery(model)
    return model.eval()


def check_shared(folder: str | Path) -> None:
    """Checks a compact folder's weights file against its plan and config from its header
    alone (dtypes, shapes, sizes, names); raises CheckpointError naming the file and tensor."""
    _checked(Path(folder))


def _checked(folder: Path) -> tuple[ElasticLlama, SharingPlan]:
    """The shared model of `folder` on the meta device and its plan, once the weights file's
    header has been checked against them."""
    plan = read_sharing(folder)["plan"]
    config = LlamaFamilyConfig.from_hf(load_hf_config(folder))
    with torch.device("meta"):
        model = ElasticLlama(config)
    share_weights(model, plan, initialise=False)
    expected = {name: tuple(tensor.shape) for name, tensor in stored_state_dict(model, plan).items()}
    path = folder / WEIGHTS
    header = safetensors_header(path, REWRITE)
    check_tensors(path, header, expected, fix=REWRITE)
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match {SHARING_FILE}: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "the weights and the plan come from different runs"
        )
    return model, plan


def storage_summary(folder: str | Path) -> dict[str, Any]:
    """Stored vs effective size of a compact folder, read from its headers alone: parameters
    stored (recovery included), effective parameters (of the merged plain model), bytes of the
    weights file, and the bytes a plain checkpoint of the same dtype would take."""
    folder = Path(folder)
    plan = read_sharing(folder)["plan"]
    config = LlamaFamilyConfig.from_hf(load_hf_config(folder))
    sizes = _tensor_sizes(folder / WEIGHTS)
    stored = sum(elements for elements, _ in sizes.values())
    element_bytes = sum(size for _, size in sizes.values()) / stored
    effective = Shape.full(config).num_parameters(config)
    stored_bytes = (folder / WEIGHTS).stat().st_size
    return {
        "sharing": {**plan.to_dict(), "pairs": " ".join(f"{layer}:{ref}" for layer, ref in plan.pairs)},
        "stored_parameters": stored,
        "recovery_parameters": sum(elements for name, (elements, _) in sizes.items() if ".adapter." in name),
        "effective_parameters": effective,
        "stored_bytes": stored_bytes,
        "plain_bytes": round(effective * element_bytes),
        "stored_fraction": round(stored_bytes / (effective * element_bytes), 4),
    }


def _tensor_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (elements, bytes) of each tensor of a safetensors file, from its header."""
    return {name: (math.prod(t.shape), t.nbytes) for name, t in safetensors_header(path, REWRITE).items()}
