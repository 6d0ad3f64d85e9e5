"""Atomic files: a path holds its old content or the complete new one, whoever writes it and
however the write ends."""

import multiprocessing
import os

import pytest

from anyshape import AnyshapeError
from anyshape.files import atomic_file, atomic_files, atomic_write_text, remove_file_leftovers

CHUNK, CHUNKS = 1 << 16, 4  # a concurrent writer's file: 256 KiB, written in 4 steps


def content(path):
    return path.read_text() if path.exists() else None


@pytest.mark.parametrize("old", [None, "old"])
def test_the_path_keeps_its_old_content_until_the_write_succeeds(tmp_path, old):
    path = tmp_path / "folder" / "record.json"
    if old is not None:
        path.parent.mkdir()
        path.write_text(old)
    with atomic_file(path) as temporary:
        temporary.write_text("new")
        assert temporary.parent == path.parent and temporary.name.startswith(".record.partial-")
        assert temporary.suffix == ".json"  # libraries that pick a format by suffix see the path's
        assert content(path) == old
    assert content(path) == "new"
    assert os.listdir(path.parent) == ["record.json"]
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("interruption", [ValueError, KeyboardInterrupt])
@pytest.mark.parametrize("old", [None, "old"])
def test_an_interrupted_write_leaves_the_old_content_and_no_temporary(tmp_path, old, interruption):
    path = tmp_path / "record.json"
    if old is not None:
        path.write_text(old)
    with pytest.raises(interruption), atomic_file(path) as temporary:
        temporary.write_text("half")
        raise interruption
    assert content(path) == old
    assert os.listdir(tmp_path) == ([] if old is None else ["record.json"])


def test_text_that_fails_to_encode_is_not_written(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(path, "new \udc80")  # a lone surrogate: UTF-8 fails at it, mid-write
    assert content(path) == "old" and os.listdir(tmp_path) == ["notes.txt"]
    atomic_write_text(path, "new")
    assert content(path) == "new" and os.listdir(tmp_path) == ["notes.txt"]


def write_repeatedly(path, byte: bytes, rounds: int) -> None:
    for _ in range(rounds):
        with atomic_file(path) as temporary, temporary.open("wb") as file:
            for _ in range(CHUNKS):
                file.write(byte * CHUNK)


def test_concurrent_writers_of_one_path_leave_one_complete_file(tmp_path):
    path = tmp_path / "tokens.safetensors"
    fork = multiprocessing.get_context("fork")
    writers = [fork.Process(target=write_repeatedly, args=(path, bytes([ord("a") + i]), 25)) for i in range(4)]
    for writer in writers:
        writer.start()
    reads = 0
    while any(writer.is_alive() for writer in writers):
        if path.exists():
            data = path.read_bytes()
            assert len(data) == CHUNK * CHUNKS and len(set(data)) == 1, "a reader saw a half-written or mixed file"
            reads += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    data = path.read_bytes()
    assert len(data) == CHUNK * CHUNKS and len(set(data)) == 1
    assert os.listdir(tmp_path) == [path.name]
    assert reads > 0


def test_a_set_of_files_appears_together_or_not_at_all(tmp_path):
    paths = [tmp_path / "report.md", tmp_path / "record.json"]
    with pytest.raises(ValueError), atomic_files(paths) as temporaries:
        for temporary in temporaries:
            temporary.write_text("half")
        raise ValueError
    assert os.listdir(tmp_path) == []
    with atomic_files(paths) as temporaries:
        for temporary, path in zip(temporaries, paths, strict=True):
            temporary.write_text(path.name)
        assert not any(path.exists() for path in paths)
    assert [content(path) for path in paths] == ["report.md", "record.json"]
    assert sorted(os.listdir(tmp_path)) == ["record.json", "report.md"]
    with pytest.raises(AnyshapeError, match="already exists"), atomic_files(paths):
        pass


def test_a_killed_writers_temporary_is_removed_and_nothing_else(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "kept.json") as temporary:
        temporary.write_text("{}")
        os.link(temporary, tmp_path / ".scores.partial-abc.safetensors")  # what a SIGKILL mid-write leaves
        raise KeyboardInterrupt
    (tmp_path / ".family.partial-dir").mkdir()
    atomic_write_text(tmp_path / "kept.json", "{}")
    remove_file_leftovers(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == [".family.partial-dir", "kept.json"]
