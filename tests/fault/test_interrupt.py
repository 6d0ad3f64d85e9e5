"""SIGKILL at random points, then resume: compress, train, prune and share end exactly where an
uninterrupted run ends, and no output folder ever looks complete when it is not. A full disk
while exporting or checkpointing leaves the previous output intact and says so in one line.

Each command runs as a subprocess on a tiny random model. A chain starts the command, kills it
(a random time into its working span, or the moment a hidden write temporary of anyshape.files
or a stage file appears, so that the kill lands mid-write), resumes it the way its help says,
kills that, and so on, until a run completes; its outputs are compared file by file with an
uninterrupted run's (tensors with torch.equal, JSON less timings). After every kill each output
folder is absent or complete: every file of a finished run, and it loads.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from safetensors import SafetensorError
from safetensors.torch import load_file

import anyshape
import anyshape.train.checkpoint
from anyshape.compress.pipeline import CompressSettings, compress
from tests.fault import tally
from tests.unit.test_cli import run

PARENT = "llama3-gqa"  # 4 layers, hidden 64, 8 query heads in 2 KV groups, MLP 96
KILLS = 5  # per command
SEED = 2024
VOLATILE = {"seconds", "tokens_per_s", "latency", "stages"}  # wall-clock timings, and which stages were reused
UNCOMPARED = {".png", ".md"}  # the plot and the report show measured latency
WRITE_TEMPORARY = re.compile(r"\.(partial|old)-|\.partial(\.|$)")  # anyshape.files' temporaries, compress's work folder


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(" ".join(f"Sentence {i} says that {i % 7} plus {i % 5} is {i % 7 + i % 5}." for i in range(400)))
    return path


@pytest.fixture
def environment(tmp_path) -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "ANYSHAPE_CACHE": str(tmp_path / "cache")}


# ---------------------------------------------------------------------------------------------
# What a finished output holds


def listing(folder: Path) -> set[str]:
    """Every file under `folder`, hidden ones included, as paths relative to it."""
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def without_volatile(record):
    if isinstance(record, dict):
        return {key: without_volatile(value) for key, value in record.items() if key not in VOLATILE}
    if isinstance(record, list):
        return [without_volatile(value) for value in record]
    return record


def assert_same_tensors(a, b, where: str) -> None:
    """Nested state (dicts, lists, tensors, numbers) equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_outputs(got: Path, want: Path) -> None:
    """The same files; tensors and JSON (less timings) equal; other files byte for byte."""
    assert listing(got) == listing(want), f"{got}: {sorted(listing(got) ^ listing(want))}"
    for name in sorted(listing(want)):
        a, b = got / name, want / name
        if a.suffix in UNCOMPARED or name.endswith("latency.json"):
            continue
        if a.suffix == ".safetensors":
            assert_same_tensors(load_file(a), load_file(b), str(a))
        elif a.suffix == ".pt":
            assert_same_tensors(torch.load(a, weights_only=True), torch.load(b, weights_only=True), str(a))
        elif a.suffix == ".json":
            assert without_volatile(json.loads(a.read_text())) == without_volatile(json.loads(b.read_text())), a
        elif a.suffix == ".jsonl":
            lines = [[without_volatile(json.loads(line)) for line in f.read_text().splitlines()] for f in (a, b)]
            assert lines[0] == lines[1], a
        else:
            assert a.read_bytes() == b.read_bytes(), a


def loads_as_model(folder: Path) -> None:
    assert torch.isfinite(anyshape.load(folder)(torch.arange(8)[None])).all(), folder


def loads_as_checkpoint(folder: Path) -> None:
    json.loads((folder / "state.json").read_text())
    for path in folder.glob("*.safetensors"):
        load_file(path)
    for path in folder.glob("*.pt"):
        torch.load(path, weights_only=True)


@dataclass
class Output:
    """A folder (relative to the run's directory) that must be absent or complete after a kill:
    complete means the files of `like` (a folder of the finished reference, or the names) and
    `loads` passes."""

    path: str
    like: str | set[str]
    loads: Callable[[Path], None]


def assert_absent_or_complete(outputs: list[Output], cwd: Path, reference: Path, after: str) -> None:
    for output in outputs:
        folder = cwd / output.path
        if not folder.exists():
            continue
        expected = output.like if isinstance(output.like, set) else listing(reference / output.like)
        try:
            assert listing(folder) == expected, sorted(listing(folder) ^ expected)
            output.loads(folder)
        except Exception as error:
            tally.count("outputs lost")
            raise AssertionError(f"{after}, {folder} looks finished but is not: {error}") from error


# ---------------------------------------------------------------------------------------------
# Killing


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every path under `root`."""
    found = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = os.path.join(folder, name)
            try:
                status = os.stat(path)
            except FileNotFoundError:  # renamed or removed while we looked
                continue
            found[path] = (status.st_size, status.st_mtime_ns)
    return found


def temporaries(paths) -> set[str]:
    return {path for path in paths if WRITE_TEMPORARY.search(os.path.basename(path))}


@dataclass
class Kill:
    """When to kill: `after` seconds into the working span (from the first change on disk or
    line on stderr: the imports are done), or on the `nth` write temporary that appears,
    whichever comes first."""

    after: float | None = None
    nth: int | None = None


@dataclass
class Outcome:
    killed: bool
    mid_write: bool = False  # a write temporary of this run was left behind: the kill landed mid-write
    span: float = 0.0  # seconds from the start of the work to the end (of a run not killed)


def run_once(command: list[str], cwd: Path, env: dict[str, str], kill: Kill | None = None) -> Outcome:
    """Runs `command` in `cwd`, killed (SIGKILL) as `kill` says; fails if it exits non-zero."""
    before = snapshot(cwd)
    log = cwd.parent / f"{cwd.name}.log"  # outside cwd: its writes are no change on disk
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "anyshape", *command], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
    began, seen = None, set()
    while process.poll() is None:
        now = snapshot(cwd)
        if began is None and (now != before or log.stat().st_size > 0):  # imports done, work begun
            began = time.monotonic()
        fresh = temporaries(now) - temporaries(before)
        seen |= fresh
        if kill is not None and (
            (kill.after is not None and began is not None and time.monotonic() - began >= kill.after)
            or (kill.nth is not None and len(seen) >= kill.nth)
        ):
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            left = temporaries(snapshot(cwd)) - temporaries(before)
            return Outcome(killed=True, mid_write=bool(left))
        time.sleep(0.002)
    assert process.returncode == 0, (
        f"anyshape {' '.join(command)} exited {process.returncode}:\n" + (log.read_text()[-3000:])
    )
    return Outcome(killed=False, span=time.monotonic() - (began or time.monotonic()))


@dataclass
class Command:
    """A command, how it resumes, and the outputs it must never leave half-written."""

    args: list[str]
    resume: Callable[[Path], list[str]]  # the command line that continues what is in the directory
    outputs: list[Output]
    final: list[str]  # folders compared with the uninterrupted run's
    leftovers: list[str] = field(default_factory=list)  # folders a finished run removes


def kill_and_resume(command: Command, tmp_path: Path, env: dict[str, str]) -> None:
    """An uninterrupted reference run, then chains of killed and resumed runs until KILLS kills
    (at least one mid-write) were each followed by a resume that completed and matched."""
    reference = tmp_path / "reference"
    reference.mkdir()
    span = run_once(command.args, reference, env).span
    rng = random.Random(SEED)
    survived = mid_writes = chains = 0
    while survived < KILLS or mid_writes == 0:
        chains += 1
        assert chains <= 4, f"only {survived} kills ({mid_writes} mid-write) in {chains - 1} chains"
        cwd = tmp_path / f"chain-{chains}"
        cwd.mkdir()
        killed = 0
        args = command.args
        for attempt in range(KILLS + 3):
            mid_write_wanted = mid_writes == 0 and (attempt == 1 or survived + killed >= KILLS - 1)
            left = (0.8 if attempt == 0 else 0.5) * span  # a resumed run has less left to do
            nth = rng.randint(1, 3) if attempt == 0 else 1
            if mid_write_wanted:
                kill = Kill(nth=nth)
            elif rng.random() < 0.3:  # or, if no temporary appears by then, at `left`
                kill = Kill(after=left, nth=nth)
            else:
                kill = Kill(after=rng.uniform(0.0, left))
            if survived + killed >= KILLS and mid_writes > 0:
                kill = None  # enough kills: let it finish
            outcome = run_once(args, cwd, env, kill)
            print(f"{cwd.name}: {' '.join(args[:2])} {kill} -> {outcome}")
            if not outcome.killed:
                break
            killed += 1
            mid_writes += outcome.mid_write
            assert_absent_or_complete(command.outputs, cwd, reference, f"after kill {killed} ({kill})")
            args = command.resume(cwd)
        else:
            pytest.fail(f"anyshape {' '.join(command.args)} never completed")
        for folder in command.final:
            try:
                assert_same_outputs(cwd / folder, reference / folder)
            except AssertionError:
                tally.count("outputs lost")
                raise
        for folder in command.leftovers:
            assert not (cwd / folder).exists(), f"a finished run left {folder} behind"
        survived += killed
        tally.count("kills survived", killed)


# ---------------------------------------------------------------------------------------------
# The four commands


@pytest.mark.integration
@pytest.mark.slow
def test_compress_killed_and_resumed_equals_an_uninterrupted_run(tiny_dir, text, tmp_path, environment):
    args = [
        "compress", str(tiny_dir(PARENT)), "--out", "family", "--data", str(text), "--num-sequences", "4",
        "--sequence-length", "32", "--search-sequences", "2", "--search-length", "32", "--trials", "5",
        "--eval-tokens", "512", "--budgets", "0.5,0.8", "--train-text", "data",
    ]  # fmt: skip

    def family_loads(folder: Path) -> None:
        json.loads((folder / "summary.json").read_text())
        for member in ("0.5", "0.8"):
            loads_as_model(folder / member)

    command = Command(
        args, resume=lambda cwd: args, outputs=[Output("family", "family", family_loads)], final=["family"],
        leftovers=[".family.partial"],
    )  # fmt: skip
    kill_and_resume(command, tmp_path, environment)


TRAIN = ["--seq-len", "32", "--save-every", "2", "--eval-every", "4"]


@pytest.mark.integration
@pytest.mark.slow
def test_train_killed_and_resumed_equals_an_uninterrupted_run(tiny_dir, text, tmp_path, environment):
    args = [
        "train", str(tiny_dir(PARENT)), "--data", str(text), "--out", "run", "--steps", "12", "--batch-size", "4",
        "--align", "16", "--fractions", "0.5,1", "--warmup-steps", "2", *TRAIN,
    ]  # fmt: skip

    def resume(cwd: Path) -> list[str]:
        return ["train", "--resume", "run"] if (cwd / "run" / "train.json").is_file() else args

    checkpoint = Output("run/checkpoint", "run/checkpoint", loads_as_checkpoint)
    kill_and_resume(Command(args, resume, [checkpoint], final=["run"]), tmp_path, environment)


@pytest.mark.integration
@pytest.mark.slow
def test_prune_killed_and_resumed_equals_an_uninterrupted_run(tiny_dir, text, tmp_path, environment):
    target = {
        "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 1,
        "intermediate_size": 48,
    }  # fmt: skip
    args = [
        "prune", str(tiny_dir(PARENT)), "--target", json.dumps(target), "--data", str(text), "--prune-steps", "10",
        "--batch-size", "2", "--out", "pruned", *TRAIN,
    ]  # fmt: skip

    def resume(cwd: Path) -> list[str]:
        return ["prune", "--resume", "--out", "pruned"] if (cwd / "pruned/run/train.json").is_file() else args

    outputs = [
        Output("pruned/model", "pruned/model", loads_as_model),
        Output("pruned/run/checkpoint", "pruned/run/checkpoint", loads_as_checkpoint),
    ]
    kill_and_resume(Command(args, resume, outputs, final=["pruned"]), tmp_path, environment)


@pytest.mark.integration
@pytest.mark.slow
def test_share_killed_and_resumed_equals_an_uninterrupted_run(tiny_dir, text, tmp_path, environment):
    args = [
        "share", str(tiny_dir(PARENT)), "--start-layer", "1", "--rank", "4", "--data", str(text), "--warmup-steps",
        "10", "--warmup-sequences", "8", "--finetune-steps", "10", "--batch-size", "2", "--out", "shared", *TRAIN[:4],
    ]  # fmt: skip
    outputs = [
        Output("shared", "shared", loads_as_model),
        Output("shared.work/warmup", "shared", loads_as_model),  # the same compact format
        Output(
            "shared.work/run/checkpoint", {"weights.safetensors", "optimizer.pt", "state.json"}, loads_as_checkpoint
        ),
    ]
    command = Command(
        args, resume=lambda cwd: [*args, "--resume"], outputs=outputs, final=["shared"], leftovers=["shared.work"]
    )
    kill_and_resume(command, tmp_path, environment)


# ---------------------------------------------------------------------------------------------
# A full disk


NO_SPACE = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
# what safetensors' save_file raises on a full disk (seen on a full tmpfs)
NO_SPACE_SAFETENSORS = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def filling_the_disk(save: Callable, fails: Callable[[Path], bool], error: Exception) -> Callable:
    """`save` (a safetensors save_file) that, for a file where `fails(path)`, writes half of it
    and raises `error`, as a write to a full disk does."""

    def save_file(tensors, filename, metadata=None) -> None:
        save(tensors, filename, metadata=metadata)
        path = Path(filename)
        if fails(path):
            os.truncate(path, path.stat().st_size // 2)
            raise error

    return save_file


def assert_says_the_disk_is_full(status: int, err: str, out: str) -> None:
    """Exit 2, no traceback, and one error line (the last) that names the disk problem and OUT."""
    assert status == 2 and "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "anyshape: error:" in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err[-3000:]
    assert "no space left" in errors[0] and out in errors[0], errors[0]


def test_a_full_disk_during_extract_leaves_the_previous_output_intact(capsys, tiny_dir, tmp_path, monkeypatch):
    model, out = tiny_dir(PARENT), tmp_path / "small"
    status, _, err = run(capsys, "extract", model, "--shape", '{"num_hidden_layers": 2}', "--out", out)
    assert status == 0, err
    before = {name: (out / name).read_bytes() for name in listing(out)}
    save = filling_the_disk(transformers.modeling_utils.safe_save_file, lambda path: True, NO_SPACE)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save)
    status, _, err = run(capsys, "extract", model, "--merge", "--out", out, "--overwrite")
    assert_says_the_disk_is_full(status, err, "small")
    assert {name: (out / name).read_bytes() for name in listing(out)} == before
    loads_as_model(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["small"], "a temporary was left beside OUT"


def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_intact(capsys, tiny_dir, text, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    run_folder = tmp_path / "run"
    written = []
    save = filling_the_disk(  # the second checkpoint's weights (step 4) do not fit
        anyshape.train.checkpoint.save_file,
        lambda path: written.append(path.name) or len(written) == 2,
        NO_SPACE_SAFETENSORS,
    )
    monkeypatch.setattr(anyshape.train.checkpoint, "save_file", save)
    args = ["--steps", "6", "--batch-size", "2", "--fractions", "0.5,1", "--align", "16", *TRAIN]
    status, _, err = run(capsys, "train", tiny_dir(PARENT), "--data", text, "--out", run_folder, *args)
    assert_says_the_disk_is_full(status, err, "checkpoint")
    checkpoint = run_folder / "checkpoint"
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 2
    assert listing(checkpoint) == {"weights.safetensors", "optimizer.pt", "state.json"}
    loads_as_checkpoint(checkpoint)
    loads_as_model(run_folder)  # a run is a MODEL
    assert not [path for path in run_folder.iterdir() if path.name.startswith(".")], "a temporary was left"
    monkeypatch.undo()  # space again: the run continues from step 2
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    status, _, err = run(capsys, "train", "--resume", run_folder)
    assert status == 0, err[-3000:]
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 6


def test_a_replacement_killed_between_its_two_renames_puts_the_previous_family_back(tiny_dir, text, tmp_path):
    """A kill after the old family was moved aside but before the new one was renamed in (a
    window of microseconds, so made by hand): re-running puts the old family back first."""
    settings = CompressSettings(
        budgets=(0.5,), data=str(text), num_sequences=4, sequence_length=32, search_sequences=2, search_length=32,
        trials=3, eval_tokens=512, train_text="data",
    )  # fmt: skip
    out = tmp_path / "family"
    compress(str(tiny_dir(PARENT)), out, settings)
    finished = listing(out)
    aside = tmp_path / ".family.old-killed"
    aside.mkdir()
    os.replace(out, aside / "family")
    (tmp_path / ".family.partial-killed").mkdir()  # what the killed writer was still writing
    messages = []
    compress(str(tiny_dir(PARENT)), out, settings, log=messages.append)
    assert messages == [f"{out} is up to date with these settings; nothing to do"]
    assert listing(out) == finished and sorted(path.name for path in tmp_path.iterdir()) == ["family"]
