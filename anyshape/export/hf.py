"""Export a Shape as a standard Hugging Face folder that `AutoModelForCausalLM` loads."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.export.extract import extract_state_dict, sub_config
from anyshape.export.provenance import write_provenance
from anyshape.files import atomic_directory
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama
from anyshape.shape import Shape


def export_hf(
    model: ElasticLlama,
    shape: Shape,
    out: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    parent: str = "",
    overwrite: bool = False,
    extra: dict | None = None,
    lineage: tuple[LlamaFamilyConfig, Shape] | None = None,
) -> Path:
    """Writes config.json, model.safetensors, generation_config.json, the tokenizer files and
    anyshape.json to `out`, atomically (a temporary folder renamed at the end).

    Returns the output folder. `parent` names the source model in the provenance record, and
    `extra` adds entries to it. When `model` is itself a sub-network cut from a parent (e.g. a
    compensated child), `lineage` gives that parent's config and the Shape it was cut at, so
    the record names those rather than `model`'s own geometry.
    """
    shape.validate(model.config)
    state_dict = extract_state_dict(model, shape)
    config = sub_config(model, shape)
    config.dtype = next(iter(state_dict.values())).dtype
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config)
    hf_model.load_state_dict(state_dict, strict=False, assign=True)
    hf_model.tie_weights()
    hf_model.generation_config = _generation_config(config)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        hf_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        parent_config, parent_shape = lineage or (model.config, shape)
        write_provenance(tmp, parent, parent_config, parent_shape, config.model_type, extra)
    return Path(out)


def _generation_config(config) -> GenerationConfig:
    """The parent folder's generation config if it has one, else one derived from the config."""
    source = getattr(config, "_name_or_path", "")
    if source and (Path(source) / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source)
    return GenerationConfig.from_model_config(config)
