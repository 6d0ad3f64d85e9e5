"""Training data: documents from files, folders and cached datasets; tokenization and its cache;
packing; the held-out split; the resumable batch order and its shards."""

from __future__ import annotations

import json
import math
import socket

import pyarrow
import pyarrow.parquet
import pytest
import torch

from anyshape import DataError
from anyshape.train import data
from anyshape.train.data import (
    Batches,
    build_training_data,
    cached_token_ids,
    pack,
    read_documents,
    shard,
    split,
    tokenize_documents,
)
from tests.conftest import byte_tokenizer

DOCUMENTS = ["First document,\nits second line.", "Second: {ü}", "third"]
EOS_ID = 256  # the byte tokenizer's 256 byte tokens are 0..255


@pytest.fixture
def tokenizer():
    """The byte tokenizer with an end-of-sequence token of its own."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "<eos>"})
    assert tokenizer.eos_token_id == EOS_ID
    return tokenizer


class CountingTokenizer:
    """Wraps a tokenizer and counts the calls that tokenize text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __len__(self):
        return len(self.tokenizer)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))


def write_parquet(path, **columns):
    pyarrow.parquet.write_table(pyarrow.table(columns), path)


def byte_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_txt_jsonl_parquet_and_folders_give_the_same_documents(tmp_path):
    (tmp_path / "one.txt").write_text(DOCUMENTS[0])
    write_jsonl(tmp_path / "all.jsonl", DOCUMENTS)
    write_parquet(tmp_path / "all.parquet", text=DOCUMENTS, id=[1, 2, 3])
    assert read_documents(tmp_path / "one.txt") == DOCUMENTS[:1]
    assert read_documents(str(tmp_path / "all.jsonl")) == DOCUMENTS
    assert read_documents(tmp_path / "all.parquet") == DOCUMENTS

    folder = tmp_path / "folder"
    (folder / "b").mkdir(parents=True)
    write_parquet(folder / "c.parquet", text=[DOCUMENTS[2]])  # written first: order is by path
    write_jsonl(folder / "b" / "2.jsonl", DOCUMENTS[1:2])
    (folder / "a.txt").write_text(DOCUMENTS[0])
    (folder / "notes.md").write_text("not training text")
    assert read_documents(folder) == DOCUMENTS


def test_blank_documents_are_dropped(tmp_path):
    (tmp_path / "gaps.jsonl").write_text('{"text": "a"}\n{"text": ""}\n{"text": "  "}\n{"text": "b"}\n')
    write_parquet(tmp_path / "gaps.parquet", text=["a", None, "", "b"])
    assert read_documents(tmp_path / "gaps.jsonl") == ["a", "b"]
    assert read_documents(tmp_path / "gaps.parquet") == ["a", "b"]


def test_parquet_without_a_text_column_names_its_columns(tmp_path):
    write_parquet(tmp_path / "rows.parquet", body=["x"], id=[1])
    with pytest.raises(DataError, match=r"no column 'text' \(its columns: body, id\)"):
        read_documents(tmp_path / "rows.parquet")


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [
        ("empty.txt", lambda path: path.write_text(" \n"), "empty.txt contains no text"),
        ("empty.jsonl", lambda path: write_jsonl(path, ["", " "]), "empty.jsonl contains no text"),
        ("empty.parquet", lambda path: write_parquet(path, text=["", None]), "empty.parquet contains no text"),
        ("missing.jsonl", lambda path: None, "missing.jsonl' not found"),
        ("folder", lambda path: path.mkdir(), "folder has no .txt, .jsonl or .parquet file"),
        ("empty.tokens", lambda path: path.write_text("\n"), "empty.tokens contains no text"),
    ],
)
def test_sources_without_text_are_refused_by_name(tmp_path, name, write, message):
    write(tmp_path / name)
    with pytest.raises(DataError, match=message):
        read_documents(tmp_path / name)


def test_a_file_of_another_suffix_is_one_text_document(tmp_path):
    (tmp_path / "wiki.train.tokens").write_text(" = Title = \n body text \n")
    assert read_documents(tmp_path / "wiki.train.tokens") == [" = Title = \n body text \n"]


def test_an_empty_file_in_a_folder_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.txt").write_text("")
    with pytest.raises(DataError, match="b.txt contains no text"):
        read_documents(tmp_path)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once, so nothing can download or hang."""

    def refuse(*args, **kwargs):
        raise OSError("network use in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_a_dataset_that_is_not_cached_is_refused_offline(no_network, tokenizer, tmp_path):
    import datasets
    from huggingface_hub import constants

    offline_before = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    for call in (
        lambda: read_documents("anyshape-tests/no-such-dataset:validation"),
        lambda: cached_token_ids(tokenizer, "anyshape-tests/no-such-dataset", tmp_path),
    ):
        with pytest.raises(
            DataError,
            match="'anyshape-tests/no-such-dataset' is no local file or folder, and no dataset .* cache",
        ):
            call()
    assert (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == offline_before
    assert list(tmp_path.iterdir()) == []


def test_a_cached_dataset_is_loaded_offline_by_name_and_split(monkeypatch, tokenizer, tmp_path):
    import datasets
    from huggingface_hub import constants

    requests = []

    def load_dataset(name, split):
        requests.append((name, split, datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE))
        return datasets.Dataset.from_dict({"text": ["a", " ", "b"], "id": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert read_documents("org/corpus:test") == ["a", "b"]
    assert read_documents("org/corpus") == ["a", "b"]
    assert requests == [("org/corpus", "test", True, True), ("org/corpus", "train", True, True)]

    counting = CountingTokenizer(tokenizer)
    first = cached_token_ids(counting, "org/corpus:test", tmp_path)
    assert cached_token_ids(counting, "org/corpus:test", tmp_path).tolist() == first.tolist()
    assert counting.calls == 1
    assert first.tolist() == byte_ids(tokenizer, "a") + [EOS_ID] + byte_ids(tokenizer, "b") + [EOS_ID]

    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_dict({"body": ["x"]}))
    with pytest.raises(DataError, match=r"'org/corpus' \(split 'train'\) has no column 'text' \(its columns: body\)"):
        read_documents("org/corpus")


def test_each_document_is_followed_by_the_end_of_sequence_id(monkeypatch, tokenizer):
    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 2)  # three documents: two tokenizer calls
    ids = tokenize_documents(tokenizer, DOCUMENTS)
    expected = [token for document in DOCUMENTS for token in byte_ids(tokenizer, document) + [EOS_ID]]
    assert ids.dtype == torch.int64 and ids.shape == (len(expected),)
    assert ids.tolist() == expected

    without_eos = byte_tokenizer()
    assert without_eos.eos_token_id is None
    expected = [token for document in DOCUMENTS for token in byte_ids(without_eos, document)]
    assert tokenize_documents(without_eos, DOCUMENTS).tolist() == expected


def test_token_ids_are_cached_until_the_source_or_tokenizer_changes(tokenizer, tmp_path):
    source = tmp_path / "corpus"
    source.mkdir()
    (source / "a.txt").write_text("some text")
    write_jsonl(source / "b.jsonl", ["more", "text"])
    cache = tmp_path / "cache"
    counting = CountingTokenizer(tokenizer)

    first = cached_token_ids(counting, source, cache)
    calls = counting.calls
    assert calls > 0 and first.tolist() == tokenize_documents(tokenizer, read_documents(source)).tolist()
    again = cached_token_ids(counting, source, cache)
    assert counting.calls == calls  # read back, not tokenized
    assert again.dtype == torch.int64 and again.tolist() == first.tolist()
    assert [path.suffix for path in cache.iterdir()] == [".safetensors"]  # no temporary file left

    (source / "a.txt").write_text("other text")
    changed = cached_token_ids(counting, source, cache)
    assert counting.calls > calls and changed.tolist() != first.tolist()
    (source / "a.txt").rename(source / "c.txt")  # same bytes, another name: another key
    calls = counting.calls
    cached_token_ids(counting, source, cache)
    assert counting.calls > calls

    without_eos = CountingTokenizer(byte_tokenizer())
    assert EOS_ID not in cached_token_ids(without_eos, source, cache).tolist()
    assert without_eos.calls > 0 and len(list(cache.iterdir())) == 4


def test_pack_cuts_consecutive_windows_and_drops_the_tail():
    ids = torch.arange(23)
    sequences = pack(ids, 5)
    assert sequences.shape == (4, 5)
    for row in range(4):
        assert sequences[row].tolist() == ids[5 * row : 5 * row + 5].tolist()
    assert pack(torch.arange(10), 5).shape == (2, 5)
    with pytest.raises(DataError, match="4 tokens, fewer than one sequence of 5.*smaller --seq-len"):
        pack(torch.arange(4), 5)


def rows_of(sequences):
    """The row numbers of sequences made by `numbered(n)`."""
    return (sequences[:, 0] // 3).tolist()


def numbered(count):
    """(count, 3) sequences whose row i is [3i, 3i + 1, 3i + 2]."""
    return torch.arange(3 * count).reshape(count, 3)


def test_split_is_seeded_disjoint_and_covers_every_sequence():
    sequences = numbered(20)
    held_out = split(sequences, 0.25, seed=3)
    assert held_out.train.shape == (15, 3) and held_out.val.shape == (5, 3)
    train, val = rows_of(held_out.train), rows_of(held_out.val)
    assert sorted(train + val) == list(range(20)) and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    again = split(sequences, 0.25, seed=3)
    assert torch.equal(again.train, held_out.train) and torch.equal(again.val, held_out.val)
    assert len({tuple(rows_of(split(sequences, 0.25, seed=seed).val)) for seed in range(5)}) > 1

    assert len(split(numbered(3), 0.01, seed=0).val) == 1  # at least one held out
    assert len(split(numbered(3), 0.99, seed=0).train) == 1  # at least one to train on
    with pytest.raises(DataError, match="only 1 sequence.*too few to split"):
        split(numbered(1), 0.5, seed=0)
    with pytest.raises(DataError, match="between 0 and 1"):
        split(sequences, 1.0, seed=0)


def test_build_training_data_splits_one_source_or_takes_a_validation_source(tokenizer, tmp_path):
    (tmp_path / "train.txt").write_text("x" * 95)
    (tmp_path / "val.txt").write_text("y" * 25)
    ids = tokenize_documents(tokenizer, ["x" * 95])
    held_out = build_training_data(tokenizer, tmp_path / "train.txt", 8, tmp_path / "cache", val_fraction=0.25, seed=1)
    expected = split(pack(ids, 8), 0.25, seed=1)
    assert torch.equal(held_out.train, expected.train) and torch.equal(held_out.val, expected.val)

    separate = build_training_data(tokenizer, tmp_path / "train.txt", 8, tmp_path / "cache", tmp_path / "val.txt")
    assert torch.equal(separate.train, pack(ids, 8))
    assert torch.equal(separate.val, pack(tokenize_documents(tokenizer, ["y" * 25]), 8))


@pytest.mark.parametrize("batch_size", [5, 4, 25])  # divides n, straddles epochs, spans several
def test_every_epoch_visits_every_sequence_once(batch_size):
    batches = Batches(numbered(10), batch_size, seed=7)
    steps = 2 * math.lcm(10, batch_size) // batch_size  # a whole number of epochs, at least 2
    order = [row for step in range(steps) for row in rows_of(batches.batch(step))]
    epochs = [order[start : start + 10] for start in range(0, len(order), 10)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled each epoch
    assert batches.epoch(steps) == len(epochs)


def test_batches_are_a_function_of_the_seed_and_step_alone():
    sequences = numbered(10)
    run = Batches(sequences, 4, seed=1)
    first_run = [run.batch(step) for step in range(12)]
    resumed = Batches(sequences.clone(), 4, seed=1)
    for step in (11, 7, 3, 0):  # a resumed run starts anywhere, in any order
        assert torch.equal(resumed.batch(step), first_run[step])
    other_seed = Batches(sequences, 4, seed=2)
    assert any(not torch.equal(other_seed.batch(step), first_run[step]) for step in range(12))
    assert first_run[0].shape == (4, 3) and run.epoch(5) == 2.0


def test_shards_are_equal_contiguous_parts_of_the_batch():
    batch = numbered(8)
    parts = [shard(batch, rank, 4) for rank in range(4)]
    assert all(part.shape == (2, 3) for part in parts)
    assert torch.equal(torch.cat(parts), batch)
    with pytest.raises(DataError, match="batch size 8 is not divisible by 3 processes.*multiple of the number"):
        shard(batch, 0, 3)
    with pytest.raises(DataError, match="rank 4 is outside 0..3"):
        shard(batch, 4, 4)
