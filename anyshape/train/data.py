"""Training data: documents from local files or a cached dataset, tokenized once and cached on
disk, packed into fixed-length sequences, split into training and validation, and batched in an
order that a resumed run continues from the step number alone.

Sources are a text file (`.txt` or any other suffix: one document), a `.jsonl` file (one document per "text" field), a
`.parquet` file (one document per row of its `text` column), a folder of such files (read
recursively, in sorted path order), or the name of a Hugging Face dataset already in the local
cache (`name` or `name:split`, split `train` by default). Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.data.text import jsonl_texts, read_text
from anyshape.errors import DataError, first_line
from anyshape.files import atomic_file

if TYPE_CHECKING:
    from datasets import Dataset

SUFFIXES = (".txt", ".jsonl", ".parquet")
DEFAULT_SPLIT = "train"
CACHE_FORMAT = "anyshape.train.data token ids v1"  # change it when tokenize_documents changes
TOKENIZE_CHUNK = 1024  # documents per tokenizer call: bounds the Python lists alive at once
HASH_CHUNK = 1 << 20  # bytes read at a time when hashing source files
EPOCH_SEED_STRIDE = 1_000_003  # epoch e of seed s is shuffled with seed s * EPOCH_SEED_STRIDE + e


def read_documents(source: str | Path) -> list[str]:
    """The documents of a file, a folder of files, or a cached dataset (see the module docstring);
    blank documents are dropped, since they would only add bare end-of-sequence tokens."""
    files = _local_files(source)
    if files is None:
        name, split_name = _dataset_name_and_split(str(source))
        return _dataset_texts(_cached_dataset(name, split_name), name, split_name)
    return [document for file in files[1] for document in _file_documents(file)]


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, documents: list[str]) -> Tensor:
    """(N,) int64 token ids: each document tokenized without special tokens, then followed by the
    tokenizer's end-of-sequence id (nothing when the tokenizer has none)."""
    separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pieces = [torch.empty(0, dtype=torch.long)]
    for start in range(0, len(documents), TOKENIZE_CHUNK):
        chunk = documents[start : start + TOKENIZE_CHUNK]
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        flat = itertools.chain.from_iterable(ids + separator for ids in encoded)
        pieces.append(torch.tensor(list(flat), dtype=torch.long))
    return torch.cat(pieces)


def cached_token_ids(tokenizer: PreTrainedTokenizerBase, source: str | Path, cache_dir: str | Path) -> Tensor:
    """(N,) int64 `tokenize_documents(tokenizer, read_documents(source))`, read back from
    `cache_dir` when the same source and tokenizer were tokenized before.

    The cache key is a SHA-256 of the source (its files' relative names and bytes, or a dataset's
    name, split and fingerprint) and of the tokenizer (class, name, vocabulary size, end-of-sequence
    id and full definition), so an edited file or another tokenizer is tokenized afresh. Processes
    that tokenize the same source at once each rename a complete cache file in (`atomic_file`).
    """
    key = hashlib.sha256()
    _update(key, CACHE_FORMAT.encode())
    files = _local_files(source)
    if files is None:
        name, split_name = _dataset_name_and_split(str(source))
        dataset = _cached_dataset(name, split_name)
        for part in ("dataset", name, split_name, getattr(dataset, "_fingerprint", "")):
            _update(key, part.encode())
        read = partial(_dataset_texts, dataset, name, split_name)
    else:
        root, paths = files
        for path in paths:
            _update_with_file(key, path.relative_to(root).as_posix(), path)
        read = partial(read_documents, source)
    _update(key, _tokenizer_identity(tokenizer))
    cache_path = Path(cache_dir) / f"{key.hexdigest()}.safetensors"
    if cache_path.is_file():
        return load_file(cache_path)["input_ids"]
    ids = tokenize_documents(tokenizer, read())
    with atomic_file(cache_path) as temporary:
        save_file({"input_ids": ids.contiguous()}, temporary)
    return ids


def pack(ids: Tensor, sequence_length: int) -> Tensor:
    """(n, sequence_length) consecutive non-overlapping windows of the token ids (N,), with
    n = N // sequence_length; the last N % sequence_length tokens are dropped."""
    if sequence_length < 2:
        raise DataError(f"the sequence length must be at least 2 tokens, got {sequence_length}; raise --seq-len")
    count = len(ids) // sequence_length
    if count < 1:
        raise DataError(
            f"the text has {len(ids)} tokens, fewer than one sequence of {sequence_length}; "
            "give more text or a smaller --seq-len"
        )
    return ids[: count * sequence_length].reshape(count, sequence_length)


@dataclass(frozen=True)
class TrainingData:
    """Packed token ids: `train` (n_train, S) to learn from, `val` (n_val, S) held out."""

    train: Tensor
    val: Tensor


def split(sequences: Tensor, val_fraction: float, seed: int) -> TrainingData:
    """Holds out round(n * val_fraction) whole sequences of `sequences` (n, S), at least 1 and
    at most n - 1, chosen by `torch.randperm` seeded with `seed`; both parts keep their order."""
    if not 0 < val_fraction < 1:
        raise DataError(f"the validation fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    count = len(sequences)
    if count < 2:
        raise DataError(
            f"only {count} sequence(s) of {sequences.shape[-1]} tokens: too few to split into training and validation; "
            "give more text, a smaller --seq-len, or a separate validation source"
        )
    val_count = min(max(round(count * val_fraction), 1), count - 1)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val_rows, train_rows = order[:val_count].sort().values, order[val_count:].sort().values
    return TrainingData(train=sequences[train_rows], val=sequences[val_rows])


def build_training_data(
    tokenizer: PreTrainedTokenizerBase,
    source: str | Path,
    sequence_length: int,
    cache_dir: str | Path,
    val_source: str | Path | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> TrainingData:
    """`source` tokenized (cached in `cache_dir`) and packed into sequences of `sequence_length`;
    the validation sequences are `val_source`'s when given (then all of `source` is for training),
    else a seeded `val_fraction` of `source`'s."""
    sequences = pack(cached_token_ids(tokenizer, source, cache_dir), sequence_length)
    if val_source is None:
        return split(sequences, val_fraction, seed)
    return TrainingData(train=sequences, val=pack(cached_token_ids(tokenizer, val_source, cache_dir), sequence_length))


class Batches:
    """Batches of rows of `sequences` (n, S) in an endless order fixed by the seed: epoch e is a
    permutation of all n rows drawn with `torch.Generator().manual_seed(seed * 1_000_003 + e)`,
    and step s takes positions [s * batch_size, (s + 1) * batch_size) of the epochs laid end to
    end. `batch(s)` depends on nothing else, so a resumed run continues from its step number."""

    def __init__(self, sequences: Tensor, batch_size: int, seed: int) -> None:
        if sequences.ndim != 2 or len(sequences) == 0:
            raise DataError(f"batches need a non-empty (n, S) tensor of sequences, got shape {tuple(sequences.shape)}")
        if batch_size < 1:
            raise DataError(f"the batch size must be at least 1, got {batch_size}")
        self.sequences = sequences
        self.batch_size = batch_size
        self.seed = seed

    def batch(self, step: int) -> Tensor:
        """(batch_size, S) token ids of training step `step` (0-based)."""
        if step < 0:
            raise DataError(f"steps count from 0, got {step}")
        count = len(self.sequences)
        start = step * self.batch_size
        first_epoch, last_epoch = start // count, (start + self.batch_size - 1) // count
        order = torch.cat([self._permutation(epoch) for epoch in range(first_epoch, last_epoch + 1)])
        offset = start - first_epoch * count
        return self.sequences[order[offset : offset + self.batch_size]]

    def epoch(self, step: int) -> float:
        """Epochs completed before step `step`: step * batch_size / n."""
        return step * self.batch_size / len(self.sequences)

    def _permutation(self, epoch: int) -> Tensor:
        """(n,) the row order of epoch `epoch`."""
        generator = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
        return torch.randperm(len(self.sequences), generator=generator)


def shard(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """(B / world_size, S) rows of the batch (B, S) for process `rank`: its contiguous equal part."""
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside 0..{world_size - 1} for {world_size} processes")
    size = len(batch)
    if size % world_size:
        raise DataError(
            f"the batch size {size} is not divisible by {world_size} processes; "
            "choose a batch size that is a multiple of the number of processes"
        )
    part = size // world_size
    return batch[rank * part : (rank + 1) * part]


def _local_files(source: str | Path) -> tuple[Path, list[Path]] | None:
    """(root, files) of a local file or folder, files in sorted path order; None for a dataset
    name (anything that is neither an existing folder nor a path with a data-file suffix)."""
    path = Path(source)
    try:
        path.is_dir()
    except OSError as error:  # e.g. a name longer than the file system allows
        raise DataError(f"data source {str(source)!r:.80} is not a usable path ({error.strerror})") from None
    if path.is_dir():
        files = sorted(file for file in path.rglob("*") if file.is_file() and file.suffix in SUFFIXES)
        if not files:
            raise DataError(f"folder {path} has no .txt, .jsonl or .parquet file; put the training text in such files")
        return path, files
    if path.suffix in SUFFIXES:
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} not found; pass a .txt, .jsonl or .parquet file or a folder")
        return path.parent, [path]
    if path.is_file():  # any other file is plain text, as for the other commands (e.g. wiki.train.tokens)
        return path.parent, [path]
    return None


def _file_documents(path: Path) -> list[str]:
    """The non-blank documents of one .jsonl or .parquet file, or of a text file (any other suffix)."""
    if path.suffix == ".parquet":
        return _parquet_documents(path)
    text = read_text(path)  # checks UTF-8, JSON lines with "text" fields, and that there is text
    documents = jsonl_texts(path, path.read_text(encoding="utf-8")) if path.suffix == ".jsonl" else [text]
    return [document for document in documents if document.strip()]


def _parquet_documents(path: Path) -> list[str]:
    """The non-blank strings of a Parquet file's `text` column."""
    import pyarrow
    import pyarrow.parquet

    try:
        schema = pyarrow.parquet.read_schema(path)
    except pyarrow.ArrowException as error:
        raise DataError(f"{path} is not a readable Parquet file ({error})") from None
    if "text" not in schema.names:
        raise DataError(
            f"{path} has no column 'text' (its columns: {', '.join(schema.names)}); name the text column 'text'"
        )
    column_type = schema.field("text").type
    if not (pyarrow.types.is_string(column_type) or pyarrow.types.is_large_string(column_type)):
        raise DataError(f"{path} column 'text' holds {column_type}, not strings; store the documents as strings")
    texts = pyarrow.parquet.read_table(path, columns=["text"]).column("text").to_pylist()
    documents = [text for text in texts if text is not None and text.strip()]
    if not documents:
        raise DataError(f"{path} contains no text")
    return documents


def _dataset_name_and_split(source: str) -> tuple[str, str]:
    """(name, split) of "name:split", or of "name" with split `train`."""
    name, _, split_name = source.partition(":")
    return name, split_name or DEFAULT_SPLIT


def _cached_dataset(name: str, split_name: str) -> Dataset:
    """The split `split_name` of a Hugging Face dataset from the local cache; the Hub is never contacted."""
    import datasets  # slow to import: only when a dataset name is given

    with _hub_offline(datasets):
        try:
            return datasets.load_dataset(name, split=split_name)
        except (OSError, datasets.exceptions.DatasetsError) as error:
            raise DataError(
                f"{name!r} is no local file or folder, and no dataset of that name (split {split_name!r}) is in the "
                f"local Hugging Face cache ({first_line(error)}); nothing is downloaded: check the path, or pass a "
                "local .txt, .jsonl or .parquet file or a folder of them"
            ) from None
        except ValueError as error:  # an unknown split
            raise DataError(f"dataset {name!r}: {error}; pass name:split with one of those splits") from None


@contextmanager
def _hub_offline(datasets: ModuleType) -> Iterator[None]:
    """Switches `datasets` and `huggingface_hub` to offline mode for the duration."""
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _dataset_texts(dataset: Dataset, name: str, split_name: str) -> list[str]:
    """The non-blank strings of a dataset's `text` column."""
    if "text" not in dataset.column_names:
        raise DataError(
            f"dataset {name!r} (split {split_name!r}) has no column 'text' (its columns: "
            f"{', '.join(dataset.column_names)}); pass a dataset with a 'text' column or a local file"
        )
    documents = [text for text in dataset["text"] if isinstance(text, str) and text.strip()]
    if not documents:
        raise DataError(f"dataset {name!r} (split {split_name!r}) contains no text")
    return documents


def _update(key: hashlib._Hash, part: bytes) -> None:
    """Adds one length-prefixed part to the hash, so that parts cannot run into each other."""
    key.update(len(part).to_bytes(8, "little"))
    key.update(part)


def _update_with_file(key: hashlib._Hash, name: str, path: Path) -> None:
    """Adds a file's relative name and bytes to the hash, reading it in chunks."""
    _update(key, name.encode())
    key.update(path.stat().st_size.to_bytes(8, "little"))
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            key.update(chunk)


def _tokenizer_identity(tokenizer: PreTrainedTokenizerBase) -> bytes:
    """The tokenizer's class, name, vocabulary size, end-of-sequence id and definition: the
    backend's full JSON for fast tokenizers, else the sorted vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    parts = (type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id, definition)
    return repr(parts).encode()
