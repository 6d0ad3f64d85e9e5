"""Untrusted and damaged files: pickles, folders that ask for their own code, safetensors and
GGUF files that are truncated or whose headers lie, integer and NaN tensors, NaN losses.

Every crafted bad file is refused with one line that names the file, the tensor and the problem
(exit 2 from the CLI), before any of its tensors is read where the header already shows the
fault; nothing in such a folder ever runs."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import anyshape
import anyshape.model.load as loading
from anyshape import AnyshapeError, CheckpointError, Shape
from anyshape.errors import DataError
from anyshape.export.gguf import export_gguf
from anyshape.importance.scores import Scores, score
from anyshape.model.load import allowing_pickle
from anyshape.share.plan import SharingPlan
from anyshape.share.storage import WEIGHTS as SHARED_WEIGHTS
from anyshape.share.storage import save_shared
from anyshape.share.tie import share_weights
from anyshape.train.checkpoint import CHECKPOINT
from anyshape.train.checkpoint import WEIGHTS as RUN_WEIGHTS
from anyshape.train.loop import train
from anyshape.train.run import iterate_metrics
from anyshape.train.settings import TrainSettings
from tests.conftest import byte_tokenizer
from tests.fault import tally
from tests.unit.test_cli import assert_bad_input, copy_of, run
from tests.unit.test_gguf import bpe_tokenizer

PARENT = "llama3-gqa"  # 4 layers, hidden 64, 8 query heads in 2 KV groups, MLP 96, untied
INPUT_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
DOWN = "model.layers.1.mlp.down_proj.weight"  # (64, 96) float32


def refused(capsys, args, *words) -> str:
    """assert_bad_input, counted as one bad file refused."""
    line = assert_bad_input(capsys, args, *words)
    tally.count("bad files refused")
    return line


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS)


@pytest.fixture
def no_tensor_reads(monkeypatch):
    """Fails the test if anyshape.load reads any safetensors data: the header must refuse first."""

    def read(*_, **__):
        raise AssertionError("tensors were read before the header was checked")

    monkeypatch.setattr(loading, "load_file", read)


def rewrite_header(path: Path, change) -> None:
    """Rewrites a safetensors file's JSON header by change(header) (in place), keeping its data."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    change(header)
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length :])


# ------------------------------------------------------------------ pickles


@pytest.fixture
def pickled(tiny_dir, tmp_path) -> Path:
    """A pre-safetensors folder of PARENT: config, tokenizer and pytorch_model.bin."""
    folder = copy_of(tiny_dir(PARENT), tmp_path, "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_is_refused_without_the_flag_and_loads_with_it(capsys, tiny_dir, pickled, tmp_path):
    out = tmp_path / "out"
    line = refused(capsys, ["extract", pickled, "--shape", "{}", "--out", out], "pytorch_model.bin", "pickle")
    assert "--allow-pickle" in line and not out.exists()
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        anyshape.load(pickled)

    expected = logits(anyshape.load(tiny_dir(PARENT)))
    torch.testing.assert_close(logits(anyshape.load(pickled, allow_pickle=True)), expected, atol=0, rtol=0)
    with allowing_pickle():
        torch.testing.assert_close(logits(anyshape.load(pickled)), expected, atol=0, rtol=0)
    status, _, err = run(capsys, "--allow-pickle", "extract", pickled, "--shape", "{}", "--out", out)
    assert status == 0, err
    torch.testing.assert_close(logits(anyshape.load(out)), expected, atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="pickle"):  # the flag lasted for that command alone
        anyshape.load(pickled)


class RunsCode:
    """A pickle that, when unpickled without weights_only, creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_allowed_pickle_still_never_runs_code(capsys, pickled, tmp_path):
    marker = tmp_path / "ran"
    torch.save({DOWN: RunsCode(marker)}, pickled / "pytorch_model.bin")
    refused(capsys, ["--allow-pickle", "evaluate", pickled, "--ppl"], "pytorch_model.bin", "not a plain pickle")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda sd: sd.update({DOWN: sd[DOWN].T.contiguous()}), ["(96, 64) in the weights", "(64, 96) by config.json"]),
        (lambda sd: sd.update({DOWN: sd[DOWN].to(torch.int32)}), ["torch.int32", "reads only"]),
        (lambda sd: sd[DOWN].__setitem__((0, 0), float("nan")), ["NaN or inf"]),
        (lambda sd: sd.pop(DOWN), ["pickled does not match its config", "missing", DOWN]),
    ],
    ids=["shape", "int32", "nan", "missing"],
)
def test_allowed_pickle_is_checked_like_safetensors(capsys, pickled, change, words):
    state_dict = torch.load(pickled / "pytorch_model.bin", weights_only=True)
    change(state_dict)
    torch.save(state_dict, pickled / "pytorch_model.bin")
    refused(capsys, ["--allow-pickle", "evaluate", pickled, "--ppl"], "pickled", *words)


# ------------------------------------------------------------------ remote code


CODE = "from pathlib import Path\nPath({marker!r}).touch()\n"


def with_own_code(folder: Path, marker: Path, model_type: str | None) -> None:
    """Gives `folder` Python files that create `marker` when imported, and config and tokenizer
    files that ask for them (auto_map, trust_remote_code)."""
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (folder / f"{module}.py").write_text(CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    config["trust_remote_code"] = True
    if model_type is None:
        config.pop("model_type")
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))


def test_a_folder_that_asks_for_its_own_code_never_runs_it(capsys, tiny_dir, tmp_path):
    marker = tmp_path / "ran"
    folder = copy_of(tiny_dir(PARENT), tmp_path, "own-code")
    with_own_code(folder, marker, "llama")  # a supported model_type: read with anyshape's own code
    status, _, err = run(capsys, "info", folder, "--json")
    assert status == 0, err
    torch.testing.assert_close(logits(anyshape.load(folder)), logits(anyshape.load(tiny_dir(PARENT))))
    assert anyshape.load_tokenizer(folder)("hello").input_ids
    assert not marker.exists()

    bare = copy_of(tiny_dir(PARENT), tmp_path, "no-model-type")
    with_own_code(bare, marker, None)  # only the folder's own code could read it: refused
    refused(capsys, ["info", bare], "config.json", "auto_map", "never runs")
    assert not marker.exists()


# ------------------------------------------------------------------ safetensors headers


@pytest.fixture
def folder(tiny_dir, tmp_path) -> Path:
    return copy_of(tiny_dir(PARENT), tmp_path)


def test_a_good_folder_passes_every_check(capsys, folder):
    status, _, err = run(capsys, "info", folder)
    assert status == 0, err


@pytest.mark.parametrize(
    ("keep", "words"),
    [
        (0.5, ["is truncated", "ends at byte", "re-download"]),
        (20, ["corrupt or truncated", "header claims"]),
        (4, ["corrupt or truncated"]),
        (0, ["corrupt or truncated"]),
    ],
    ids=["data", "header", "length", "empty"],
)
def test_truncated_safetensors_is_refused_from_its_header(capsys, folder, no_tensor_reads, keep, words):
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    refused(capsys, ["info", folder], str(weights), *words)
    with pytest.raises(CheckpointError, match="truncated"):
        anyshape.load(folder)


def _shape(header):
    header[DOWN]["shape"] = [96, 64]  # the same bytes, the wrong shape


def _half(header):
    header[DOWN]["dtype"] = "F16"  # offsets still span float32 data


def _int(header):
    header[DOWN]["dtype"] = "I32"  # the same bytes, integers


def _past_end(header):
    start, end = header[DOWN]["data_offsets"]
    header[DOWN]["data_offsets"] = [start + 10**9, end + 10**9]


def _malformed(header):
    header[DOWN]["shape"] = "64x96"


def _unknown(header):
    header[DOWN]["dtype"] = "F7"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_shape, [DOWN, "(96, 64) in the weights", "(64, 96) by config.json", "different models"]),
        (_half, [DOWN, "header is corrupt", "F16", "needs"]),
        (_int, [DOWN, "is I32", "reads only"]),
        (_past_end, [DOWN, "truncated", "ends at byte"]),
        (_malformed, [DOWN, "malformed"]),
        (_unknown, [DOWN, "'F7'"]),
    ],
    ids=["shape", "dtype-size", "int-dtype", "past-end", "malformed", "unknown-dtype"],
)
def test_a_header_that_lies_is_refused_before_any_tensor_is_read(capsys, folder, no_tensor_reads, change, words):
    weights = folder / "model.safetensors"
    rewrite_header(weights, change)
    refused(capsys, ["info", folder], str(weights), *words)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        anyshape.load(folder)


def test_an_integer_tensor_is_refused(capsys, folder, no_tensor_reads):
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors[DOWN] = torch.randint(-5, 5, (64, 96), dtype=torch.int64)
    save_file(tensors, weights, metadata={"format": "pt"})
    refused(capsys, ["info", folder], str(weights), DOWN, "I64", "float checkpoint")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nan_weights_are_refused_at_load(capsys, folder, tmp_path, value):
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors[DOWN][3, 5] = value
    save_file(tensors, weights, metadata={"format": "pt"})
    out = tmp_path / "out"
    refused(capsys, ["extract", folder, "--shape", "{}", "--out", out], str(weights), DOWN, "1 NaN or inf")
    assert not out.exists()


# ------------------------------------------------------------------ GGUF


@pytest.fixture(scope="module")
def good_gguf(tiny_dir, tmp_path_factory) -> Path:
    model = anyshape.load(tiny_dir("llama-mha-tied"))
    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    return export_gguf(model, Shape.full(model.config), out, bpe_tokenizer(), outtype="f32")


@pytest.fixture
def gguf_copy(good_gguf, tmp_path) -> Path:
    path = tmp_path / "model.gguf"
    shutil.copy(good_gguf, path)
    return path


def tensor_info(data: bytes, name: str) -> int:
    """Offset of the n_dims field of `name`'s tensor info in a GGUF file."""
    encoded = name.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded)
    return at + 8 + len(encoded)


def test_a_good_gguf_passes_every_check(tiny_dir, good_gguf):
    expected = logits(anyshape.load(tiny_dir("llama-mha-tied")))
    torch.testing.assert_close(logits(anyshape.load(good_gguf)), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("cut", "words"),
    [(-1000, ["is truncated", "blk.3.ffn_down.weight", "ends at byte"]), (5000, ["corrupt or truncated GGUF"])],
    ids=["data", "header"],
)
def test_truncated_gguf_is_refused(capsys, gguf_copy, cut, words):
    data = gguf_copy.read_bytes()
    gguf_copy.write_bytes(data[:cut])
    refused(capsys, ["info", gguf_copy], str(gguf_copy), *words)


def test_gguf_with_a_wrong_shape_is_refused_before_dequantizing(capsys, gguf_copy):
    data = bytearray(gguf_copy.read_bytes())
    at = tensor_info(bytes(data), "blk.1.ffn_up.weight")  # dims (64, 96) innermost first
    assert struct.unpack_from("<I2Q", data, at) == (2, 64, 96)
    struct.pack_into("<2Q", data, at + 4, 96, 64)
    gguf_copy.write_bytes(bytes(data))
    refused(capsys, ["info", gguf_copy], str(gguf_copy), "blk.1.ffn_up.weight", "(64, 96) in the file", "(96, 64)")


def test_gguf_with_an_integer_tensor_is_refused(capsys, gguf_copy):
    data = bytearray(gguf_copy.read_bytes())
    at = tensor_info(bytes(data), "blk.0.ffn_gate.weight")
    struct.pack_into("<I", data, at + 4 + 2 * 8, 26)  # GGML type I32: as many bytes as F32
    gguf_copy.write_bytes(bytes(data))
    refused(capsys, ["info", gguf_copy], str(gguf_copy), "blk.0.ffn_gate.weight", "I32", "integer")


# ------------------------------------------------------------------ shared models and training runs


@pytest.fixture
def shared(tiny_dir, tmp_path) -> Path:
    model = anyshape.load(tiny_dir(PARENT))
    plan = SharingPlan(((3, 2),), ("mlp",), "lowrank", 4)
    share_weights(model, plan)
    return save_shared(model, plan, tmp_path / "shared", byte_tokenizer())


def test_shared_model_weights_are_checked(capsys, shared):
    weights = shared / SHARED_WEIGHTS
    status, _, err = run(capsys, "info", shared)
    assert status == 0, err
    tensors = load_file(weights)
    tensors["model.layers.3.mlp.up_proj.adapter.lora_A"][0, 0] = float("nan")
    save_file(tensors, weights)
    refused(capsys, ["evaluate", shared, "--ppl"], str(weights), "mlp.up_proj.adapter.lora_A", "NaN")
    rewrite_header(weights, lambda header: header[DOWN].update(dtype="I32"))
    refused(capsys, ["info", shared], str(weights), DOWN, "I32")
    weights.write_bytes(weights.read_bytes()[:-100])
    refused(capsys, ["info", shared], str(weights), "truncated")


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "train.txt"
    path.write_text(" ".join(f"Sentence {i} says that {i % 7} plus {i % 5} is {i % 7 + i % 5}." for i in range(200)))
    return path


def settings_for(model: Path, text: Path, out: Path, **changes) -> TrainSettings:
    return TrainSettings(
        model=str(model), data=str(text), out=str(out), steps=2, seq_len=16, batch_size=2, align=16,
        fractions=(0.5, 1.0), save_every=2, eval_every=2, warmup_steps=1, **changes,
    )  # fmt: skip


def test_training_checkpoint_weights_are_checked(capsys, tiny_dir, text, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    run_folder = tmp_path / "run"
    train(settings_for(tiny_dir(PARENT), text, run_folder))
    weights = run_folder / CHECKPOINT / RUN_WEIGHTS
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, weights)
    refused(capsys, ["evaluate", run_folder, "--ppl"], str(weights), name, "NaN", "damaged")
    rewrite_header(weights, lambda header: header[name].update(dtype="I32"))
    refused(capsys, ["info", run_folder], str(weights), name, "I32", "damaged")
    with pytest.raises(CheckpointError, match="I32"):
        train(settings_for(tiny_dir(PARENT), text, run_folder), resume=True)


# ------------------------------------------------------------------ scores


def test_scores_with_nan_are_refused_naming_the_file_and_key(capsys, tiny_dir, tmp_path):
    path = tmp_path / "scores.safetensors"
    model = anyshape.load(tiny_dir(PARENT))
    scores = score(model, INPUT_IDS, metric="magnitude")
    scores.heads.view(-1)[5] = float("nan")
    scores.save(path)
    with pytest.raises(DataError, match=r"scores\.safetensors: tensor heads holds 1 NaN"):
        Scores.load(path)
    refused(
        capsys, ["sort", tiny_dir(PARENT), "--scores", path, "--out", tmp_path / "sorted"], str(path), "heads", "NaN"
    )
    tensors = load_file(path)
    tensors["heads"] = tensors["heads"].to(torch.int32)
    save_file(tensors, path)
    with pytest.raises(DataError, match="tensor heads is I32"):
        Scores.load(path)
    tally.count("bad files refused")


# ------------------------------------------------------------------ numerical faults in training


@pytest.fixture
def nan_loss_model(tiny_dir, tmp_path) -> Path:
    """A folder whose weights are finite but whose logits overflow to inf, so every loss is NaN."""
    folder = copy_of(tiny_dir(PARENT), tmp_path, "overflows")
    tensors = load_file(folder / "model.safetensors")
    tensors["lm_head.weight"] = torch.full_like(tensors["lm_head.weight"], 3e38)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_nonfinite_steps_are_skipped_and_logged(nan_loss_model, text, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    messages: list[str] = []
    settings = settings_for(nan_loss_model, text, tmp_path / "run", on_nonfinite="skip")
    train(settings, log=messages.append)
    skipped = [m for m in messages if "skipped" in m]
    assert [m.split(":")[0] for m in skipped] == ["step 1", "step 2"], messages
    assert "loss of largest" in skipped[0] and "not finite" in skipped[0]
    assert [record["skipped"] for record in iterate_metrics(tmp_path / "run") if "skipped" in record] == [True, True]
    before, after = load_file(nan_loss_model / "model.safetensors"), anyshape.load(tmp_path / "run").state_dict()
    torch.testing.assert_close(after[DOWN], before[DOWN], atol=0, rtol=0)  # no step was applied


def test_nonfinite_steps_stop_the_run_when_asked(capsys, nan_loss_model, text, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    settings = settings_for(nan_loss_model, text, tmp_path / "run", on_nonfinite="stop")
    with pytest.raises(AnyshapeError, match=r"step 1: the loss of largest.* is not finite.*on_nonfinite is stop"):
        train(settings)
    args = ["train", nan_loss_model, "--data", text, "--out", tmp_path / "cli", "--steps", 2, "--seq-len", 16]
    status, out, err = run(capsys, *args, "--batch-size", 2, "--on-nonfinite", "stop")
    last = err.splitlines()[-1]  # after the progress bar
    assert status == 2 and out == "" and "Traceback" not in err, err
    assert last.startswith("anyshape: error: step 1: the loss of largest") and "--on-nonfinite skip" in last, last
    assert_bad_input(capsys, [*args, "--on-nonfinite", "halt"], "on_nonfinite", "skip, stop")


def test_a_run_stopped_at_a_nonfinite_step_resumes_skipping_it(tiny_dir, text, tmp_path, monkeypatch):
    """A fault at step 2 of a healthy model: step 1 is checkpointed, and the resumed run skips step 2."""
    import anyshape.train.loop as loop

    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    calls = []

    def second_step_fails(losses, norms):
        calls.append(None)
        return "the loss of largest is not finite" if len(calls) == 2 else None

    monkeypatch.setattr(loop, "_nonfinite", second_step_fails)
    settings = settings_for(tiny_dir(PARENT), text, tmp_path / "run", on_nonfinite="stop")
    with pytest.raises(AnyshapeError, match=r"step 2: .*its checkpoint holds step 1: resume it skipping"):
        train(settings)
    messages: list[str] = []
    calls.clear()
    calls.append(None)  # the resumed run's first step is step 2
    result = train(replace(settings, on_nonfinite="skip"), resume=True, log=messages.append)
    assert result["step"] == 2 and any(m.startswith("step 2: the loss of largest") for m in messages), messages
