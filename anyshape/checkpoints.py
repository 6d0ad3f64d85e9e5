"""Every kind of MODEL a command takes, in one table: its marker, its loader, its checker.

    Hugging Face folder or GGUF file   config.json / *.gguf   `anyshape.model.load`
    training run (`anyshape train`)    train.json             the parent plus the run's trained
                                                              weights and adapters
    shared model (`anyshape share`)    sharing.json           each weight stored once, plus the
                                                              recovery factors

A folder with a marker is that kind; anything else is read as a Hugging Face folder or a GGUF
file. A run has no config or tokenizer of its own: both are its parent's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import CheckpointError, first_line
from anyshape.model import load as plain
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama
from anyshape.share.storage import SHARING_FILE, check_shared, load_shared
from anyshape.train.checkpoint import add_trainable_modules, check_run, load_checkpoint
from anyshape.train.settings import RUN_FILE, read_settings


def load_run(run: Path, dtype: torch.dtype = torch.float32, allow_pickle: bool | None = None) -> ElasticLlama:
    """The trained model of RUN: its parent (read as `load` would, `allow_pickle` included) with
    the run's adapters and trained weights."""
    settings = read_settings(run)
    model = load(settings.model, dtype=dtype, allow_pickle=allow_pickle)
    add_trainable_modules(model, settings)
    load_checkpoint(run, model)
    return model.requires_grad_(False).eval()


def run_parent(run: Path) -> str:
    """The model a training run folder started from."""
    record = run / RUN_FILE
    try:
        parent = json.loads(record.read_text())["settings"]["model"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise CheckpointError(f"{record} is unreadable ({first_line(error)}); the run folder is damaged") from None
    if not isinstance(parent, str) or Path(parent).expanduser().resolve() == run.resolve():
        raise CheckpointError(f"{record} names {parent!r:.80} as the run's parent model; the run folder is damaged")
    return parent


@dataclass(frozen=True)
class FolderKind:
    """A folder anyshape writes that `load` reads as a model."""

    name: str
    marker: str  # the file that marks such a folder
    load: Callable[[Path, torch.dtype, bool | None], ElasticLlama]
    check: Callable[[Path], None]  # its weights files' headers, without reading a tensor
    parent: Callable[[Path], str] | None = None  # where its config and tokenizer come from, if not from itself


KINDS = (
    FolderKind("training run", RUN_FILE, load_run, check_run, parent=run_parent),
    FolderKind("shared model", SHARING_FILE, lambda path, dtype, allow_pickle: load_shared(path, dtype), check_shared),
)


def kind_of(path: Path) -> FolderKind | None:
    """The kind of anyshape folder `path` is, or None for a Hugging Face folder or GGUF file."""
    try:
        return next((kind for kind in KINDS if path.is_dir() and (path / kind.marker).is_file()), None)
    except OSError:  # e.g. a name longer than the file system allows: `resolve` says it is not found
        return None


def resolve(ref: str | Path) -> Path:
    """The file or folder that `ref` names: an anyshape folder, an embedded model name, a .gguf
    file or a Hugging Face folder."""
    path = Path(str(ref)).expanduser()
    if kind_of(path) is not None:
        return path
    return plain.resolve(ref)


def load(ref: str | Path, dtype: torch.dtype = torch.float32, allow_pickle: bool | None = None) -> ElasticLlama:
    """MODEL as an ElasticLlama with `dtype` weights, on CPU, whatever its kind.

    Pickle weights (pytorch_model.bin, ...) are refused unless `allow_pickle` is True (None: as
    the enclosing `allowing_pickle` block says, else False); for files you trust only."""
    path = resolve(ref)
    kind = kind_of(path)
    if kind is not None:
        return kind.load(path, dtype, allow_pickle)
    return plain.load(path, dtype, allow_pickle)


def config_source(ref: str | Path) -> Path:
    """The file or folder that holds MODEL's config and tokenizer: a run's parent's, else its own."""
    path = resolve(ref)
    kind = kind_of(path)
    return config_source(kind.parent(path)) if kind is not None and kind.parent is not None else path


def load_hf_config(ref: str | Path) -> PretrainedConfig:
    """MODEL's `transformers` config, read without loading weights."""
    return plain.load_hf_config(config_source(ref))


def load_config(ref: str | Path) -> LlamaFamilyConfig:
    return LlamaFamilyConfig.from_hf(load_hf_config(ref))


def load_tokenizer(ref: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored with MODEL (a run's: its parent's); raises CheckpointError if there is none."""
    return plain.load_tokenizer(config_source(ref))


def check_weights(ref: str | Path) -> None:
    """Checks MODEL's weights files against its config from their headers alone (dtypes,
    shapes, sizes), without reading any tensor; raises CheckpointError naming the file, the
    tensor and the fix. Pickle weights are left to `load`."""
    path = resolve(ref)
    kind = kind_of(path)
    if kind is None:
        plain.check_weights(path)
        return
    if kind.parent is not None:
        check_weights(kind.parent(path))
    kind.check(path)
