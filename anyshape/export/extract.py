"""Shape -> the standalone state dict of the sub-network, by running the slicer."""

from __future__ import annotations

import copy

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from torch import Tensor
from transformers import MistralConfig, PretrainedConfig

from anyshape.errors import ShapeError
from anyshape.model.adapters import has_adapters, merged
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama
from anyshape.model.slicing import slice_parameter
from anyshape.shape import Shape


def extract_state_dict(model: ElasticLlama, shape: Shape) -> dict[str, Tensor]:
    """HF-named tensors of the Shape's sub-network, kept layers renumbered 0..n-1.

    Tensors are contiguous copies, independent of the parent. A tied LM head is omitted, as in
    Hugging Face checkpoints. Adapters (of a training run) are merged into their base weights.
    """
    shape.validate(model.config)
    if has_adapters(model):
        model = merged(model, shape)
    renumber = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(shape.layers)}
    state_dict = {}
    for name, tensor in model.state_dict().items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.startswith("model.layers."):
            prefix = ".".join(name.split(".")[:3]) + "."
            if prefix not in renumber:
                continue
            name = renumber[prefix] + name[len(prefix) :]
        state_dict[name] = slice_parameter(name, tensor, model.config, shape).contiguous().clone()
    return state_dict


def extract_model(model: ElasticLlama, shape: Shape) -> ElasticLlama:
    """The Shape's sub-network as its own ElasticLlama, with weights independent of the parent.

    Its full Shape computes what the parent computes at `shape`, and exporting it at its full
    Shape writes the same checkpoint as exporting the parent at `shape`.
    """
    config = LlamaFamilyConfig.from_hf(sub_config(model, shape))
    state_dict = extract_state_dict(model, shape)
    if config.tie_word_embeddings:
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    with torch.device("meta"):
        child = ElasticLlama(config)
    child.load_state_dict(state_dict, assign=True)
    if config.tie_word_embeddings:
        child.lm_head.weight = child.model.embed_tokens.weight
    return child.to(model.inv_freq.device).train(model.training)


def sub_config(model: ElasticLlama, shape: Shape) -> PretrainedConfig:
    """The parent's `transformers` config with the Shape's geometry.

    `transformers`' LlamaConfig refuses a hidden_size that is not a multiple of
    num_attention_heads even when head_dim is explicit (its issue #46082), so such a Shape of
    a bias-free Llama is written as MistralConfig, whose model computes the same function
    (Llama without biases, sliding_window=None).
    """
    if model.config.hf is None:
        raise ValueError("the model has no transformers config to export; load it with anyshape.load")
    config = copy.deepcopy(model.config.hf)
    config.num_hidden_layers = len(shape.layers)
    config.hidden_size = shape.hidden_size
    config.num_attention_heads = shape.num_attention_heads
    config.num_key_value_heads = shape.num_key_value_heads
    config.intermediate_size = shape.intermediate_size
    config.head_dim = model.config.head_dim  # hidden_size / heads may no longer equal it
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in shape.layers]
    try:
        config.validate()
    except StrictDataclassError as error:
        config = _as_mistral(model, config, error)
    return config


def _as_mistral(model: ElasticLlama, config: PretrainedConfig, error: Exception) -> PretrainedConfig:
    parent = model.config
    if parent.model_type != "llama" or parent.qkv_bias or parent.o_bias or parent.mlp_bias:
        raise ShapeError(
            f"transformers {transformers.__version__} refuses this {parent.model_type} config "
            f"({str(error).splitlines()[-1].strip()}); choose a hidden_size that is a multiple of "
            f"num_attention_heads={config.num_attention_heads}"
        )
    values = {**config.to_dict(), "model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    values["sliding_window"] = None
    return MistralConfig.from_dict(values)
