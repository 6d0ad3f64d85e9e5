"""The `anyshape` command on tiny random checkpoints: every bad input is exit status 2 with one
line on stderr that names the problem and the fix; the good paths print what they promise."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from anyshape.cli import main
from tests.conftest import TINY_CONFIGS, build_tiny

PARENT = "llama3-gqa"  # 4 layers, hidden 64, 8 query heads in 2 KV groups, MLP 96, untied


def run(capsys, *args) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `anyshape ARGS...`, run in-process."""
    capsys.readouterr()  # drop whatever earlier steps printed
    status = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


def assert_bad_input(capsys, args, *words: str) -> str:
    """Runs the command; asserts exit 2 and one stderr line containing every word (any case)."""
    status, out, err = run(capsys, *args)
    assert status == 2, f"exit {status}, stderr:\n{err}"
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("anyshape: error: "), line
    for word in words:
        assert word.lower() in line.lower(), f"{word!r} not in: {line}"
    assert out == ""
    return line


def copy_of(folder: Path, tmp_path: Path, name: str = "model") -> Path:
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    return copy


def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("Structured pruning keeps the most important heads, neurons and channels. " * 4)
    return path


# ------------------------------------------------------------------ bad Shapes


@pytest.mark.parametrize(
    ("shape", "words"),
    [
        ('{"hidden_size": 48,}', ["not valid JSON", "quote field names"]),
        ("{hidden_size: 48}", ["not valid JSON", "quote field names"]),
        ('{"hidden": 48}', ["unknown shape field 'hidden'", "allowed fields", "hidden_size"]),
        ('{"layers": [0, 4]}', ["layers", "index 4", "out of range", "4 layers", "0..3"]),
        ('{"layers": [-1]}', ["index -1", "out of range", "0..3"]),
        (
            '{"num_attention_heads": 7}',
            ["num_attention_heads=7", "not a multiple", "num_key_value_heads=2", "such as 6"],
        ),
        ('{"hidden_size": 65}', ["hidden_size=65", "out of range", "hidden_size=64", "1..64"]),
        ('{"intermediate_size": 1000}', ["intermediate_size=1000", "1..96"]),
        ('{"num_key_value_heads": 3}', ["num_key_value_heads=3", "1..2"]),
        ('{"layers": []}', ["layers is empty", "at least one layer"]),
        ("", ["neither inline JSON", "nor a JSON file"]),
        ("no-such-shape.json", ["no-such-shape.json", "neither inline JSON", "nor a JSON file"]),
    ],
    ids=[
        "bad-json-comma",
        "bad-json-unquoted",
        "unknown-field",
        "layer-out-of-range",
        "negative-layer",
        "heads-not-multiple-of-groups",
        "hidden-too-big",
        "mlp-too-big",
        "kv-heads-too-many",
        "empty-layers",
        "empty-string",
        "missing-shape-file",
    ],
)
def test_bad_shape(capsys, tiny_dir, shape, words):
    assert_bad_input(capsys, ["info", tiny_dir(PARENT), "--shape", shape], *words)


def test_bad_shape_in_a_file(capsys, tiny_dir, tmp_path):
    path = tmp_path / "shape.json"
    path.write_text('{"layers": [0, 1], "hidden_size": 0}')
    assert_bad_input(capsys, ["info", tiny_dir(PARENT), "--shape", path], "hidden_size=0", "1..64")


@pytest.mark.parametrize("command", ["extract", "eval"])
def test_bad_shape_fails_before_loading_or_writing(capsys, tiny_dir, tmp_path, command):
    shape = '{"layers": [0, 9]}'
    extra = ["--out", tmp_path / "out"] if command == "extract" else ["--data", text_file(tmp_path)]
    assert_bad_input(capsys, [command, tiny_dir(PARENT), "--shape", shape, *extra], "index 9", "0..3")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ bad checkpoints


def test_missing_model_path(capsys, tmp_path):
    missing = tmp_path / "no-such-model"
    assert_bad_input(capsys, ["info", missing], str(missing), "not found", "Hugging Face folder", "smollm2-135m")


def test_hub_id_is_not_downloaded(capsys):
    assert_bad_input(capsys, ["info", "HuggingFaceTB/SmolLM2-135M"], "not found", "never downloads", "--local-dir")


def test_folder_without_config(capsys, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert_bad_input(capsys, ["info", folder], "no config.json", "Hugging Face model folder")


def test_safetensors_file_instead_of_folder(capsys, tiny_dir):
    path = tiny_dir(PARENT) / "model.safetensors"
    assert_bad_input(capsys, ["info", path], "weights file", "pass the folder")


def test_other_file(capsys, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a model")
    assert_bad_input(capsys, ["info", path], "neither a .gguf file nor a Hugging Face folder")


def test_corrupt_safetensors(capsys, tiny_dir, tmp_path):
    folder = copy_of(tiny_dir(PARENT), tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)  # garbage of a plausible size
    out = tmp_path / "out"
    assert_bad_input(
        capsys,
        ["extract", folder, "--shape", '{"num_hidden_layers": 2}', "--out", out],
        str(weights),
        "corrupt",
        "re-download",
    )
    assert not out.exists()


def test_truncated_safetensors(capsys, tiny_dir, tmp_path):
    folder = copy_of(tiny_dir(PARENT), tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # header intact, tensors cut off
    assert_bad_input(
        capsys,
        ["eval", folder, "--data", text_file(tmp_path), "--window", 16, "--max-tokens", 64],
        str(weights),
        "truncated",
        "re-download",
    )


def test_weights_from_another_model(capsys, tiny_dir, tmp_path):
    folder = copy_of(tiny_dir(PARENT), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 80
    (folder / "config.json").write_text(json.dumps(config))
    assert_bad_input(
        capsys,
        ["eval", folder, "--data", text_file(tmp_path), "--window", 16, "--max-tokens", 64],
        "in the weights but",
        "by config.json",
        "different models",
    )


PICKLE_WORDS = ("pickle", "arbitrary code", "refuses", "safetensors", "save_pretrained")


@pytest.fixture(scope="module")
def pickle_state_dict() -> dict[str, torch.Tensor]:
    return build_tiny(PARENT).state_dict()


@pytest.mark.parametrize("with_config", [False, True], ids=["bin-only", "bin-and-config"])
def test_pickle_folder_is_refused(capsys, tiny_dir, tmp_path, pickle_state_dict, with_config):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(pickle_state_dict, folder / "pytorch_model.bin")
    if with_config:  # a whole pre-safetensors folder: refused when the weights are read
        shutil.copy(tiny_dir(PARENT) / "config.json", folder)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny_dir(PARENT) / name, folder)
        args = ["extract", folder, "--shape", "{}", "--out", tmp_path / "out"]
    else:
        args = ["info", folder]
    assert_bad_input(capsys, args, "pytorch_model.bin", *PICKLE_WORDS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_file_is_refused(capsys, tmp_path, pickle_state_dict, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save(pickle_state_dict, path)
    assert_bad_input(capsys, ["info", path], path.name, *PICKLE_WORDS)


@pytest.mark.parametrize("model_type", ["gpt2", "phi3"])
def test_unsupported_model_type(capsys, tiny_dir, tmp_path, model_type):
    folder = copy_of(tiny_dir(PARENT), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    (folder / "config.json").write_text(json.dumps(config))
    assert_bad_input(capsys, ["info", folder], f"model_type '{model_type}'", "not support", "llama", "qwen2")


def test_config_not_json(capsys, tiny_dir, tmp_path):
    folder = copy_of(tiny_dir(PARENT), tmp_path)
    (folder / "config.json").write_text('{"model_type": "llama",')
    assert_bad_input(capsys, ["info", folder], "config.json is not valid JSON", "line 1", "re-download")


def test_folder_without_tokenizer(capsys, tiny_dir, tmp_path):
    folder = copy_of(tiny_dir(PARENT), tmp_path)
    for path in folder.glob("tokenizer*"):
        path.unlink()
    assert_bad_input(
        capsys,
        ["extract", folder, "--shape", "{}", "--out", tmp_path / "out"],
        "no usable tokenizer",
        "save_pretrained",
    )
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ bad options


def test_missing_data_file(capsys, tiny_dir, tmp_path):
    missing = tmp_path / "missing.txt"
    assert_bad_input(capsys, ["eval", tiny_dir(PARENT), "--data", missing], "missing.txt", "not found", ".jsonl")


def test_text_too_short(capsys, tiny_dir, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a")
    assert_bad_input(capsys, ["eval", tiny_dir(PARENT), "--data", path], "1 token", "at least 2")


def test_out_exists_without_overwrite(capsys, tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_bad_input(
        capsys,
        ["extract", tiny_dir(PARENT), "--shape", "{}", "--out", out],
        str(out),
        "already exists",
        "--overwrite",
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_out_under_a_file(capsys, tiny_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_bad_input(
        capsys,
        ["extract", tiny_dir(PARENT), "--shape", "{}", "--out", blocker / "out"],
        "not a writable folder",
        "another --out",
    )


def test_stride_larger_than_window(capsys, tiny_dir, tmp_path):
    assert_bad_input(
        capsys,
        ["eval", tiny_dir(PARENT), "--data", text_file(tmp_path), "--window", 8, "--stride", 9],
        "--stride",
        "stride 9 is larger than window 8",
        "at most 8",
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["eval", "MODEL", "--window", 1], ["--window", "2"]),
        (["eval", "MODEL", "--window", "big"], ["--window"]),
        (["eval", "MODEL", "--no-ppl"], ["nothing to evaluate", "--ppl"]),
        (["extract", "MODEL", "--out", "OUT"], ["exactly one of --shape, --budget and --merge", "extract --help"]),
        (["extract", "MODEL", "--shape", "{}", "--out", "OUT", "--dtype", "int8"], ["int8", "float32"]),
        (["info", "MODEL", "--nope"], ["no such option", "--nope", "anyshape info --help"]),
        (["info"], ["missing argument", "MODEL"]),
        (["shrink", "MODEL"], ["no such command", "shrink", "anyshape --help"]),
    ],
    ids=[
        "window-too-small",
        "window-not-int",
        "no-ppl",
        "no-shape",
        "bad-dtype",
        "bad-option",
        "no-model",
        "bad-command",
    ],
)
def test_bad_arguments(capsys, tiny_dir, tmp_path, args, words):
    replace = {"MODEL": tiny_dir(PARENT), "OUT": tmp_path / "out"}
    assert_bad_input(capsys, [replace.get(arg, arg) for arg in args], *words)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ good paths


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_info_json_counts_parameters(capsys, tiny_dir, name):
    folder = tiny_dir(name)
    status, out, err = run(capsys, "info", folder, "--json")
    assert status == 0, err
    record = json.loads(out)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    assert record["num_parameters"] == sum(p.numel() for p in reference.parameters())
    embeddings = reference.get_input_embeddings().weight.numel()
    if not record["tie_word_embeddings"]:
        embeddings += reference.get_output_embeddings().weight.numel()
    assert record["num_parameters_non_embedding"] == record["num_parameters"] - embeddings
    assert record["model_type"] == TINY_CONFIGS[name].model_type
    assert record["shape"]["layers"] == [0, 1, 2, 3]


def test_info_text_of_a_shape(capsys, tiny_dir):
    status, out, _ = run(capsys, "info", tiny_dir(PARENT), "--shape", '{"layers": [1, 3], "hidden_size": 32}')
    assert status == 0
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["num_hidden_layers"] == "2"
    assert lines["hidden_size"] == "32"


def test_extract_then_eval(capsys, tiny_dir, tmp_path, hf_perplexity):
    parent = tiny_dir(PARENT)
    out = tmp_path / "small"
    shape = '{"layers": [0, 2, 3], "hidden_size": 48, "num_attention_heads": 4, "intermediate_size": 64}'
    status, stdout, err = run(capsys, "extract", parent, "--shape", shape, "--out", out, "--json")
    assert status == 0, err
    extracted = json.loads(stdout)
    assert extracted["out"] == str(out)
    assert extracted["shape"]["layers"] == [0, 2, 3]

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in reloaded.parameters()) == extracted["num_parameters"]
    assert json.loads((out / "anyshape.json").read_text())["shape"] == extracted["shape"]

    protocol = ["--data", text_file(tmp_path), "--window", 32, "--stride", 16, "--max-tokens", 128, "--json"]
    status, stdout, err = run(capsys, "eval", out, *protocol)
    assert status == 0, err
    evaluated = json.loads(stdout)
    # The perplexity transformers gives the exported folder by the same protocol, and exp of the mean NLL.
    reference = hf_perplexity(out, text_file(tmp_path).read_text(), window=32, stride=16, max_tokens=128)
    assert evaluated["perplexity"] == pytest.approx(reference, rel=1e-4)
    assert evaluated["perplexity"] == pytest.approx(math.exp(evaluated["nll"]), rel=1e-6)
    assert evaluated["num_parameters"] == extracted["num_parameters"]
    assert (evaluated["window"], evaluated["stride"]) == (32, 16)
    assert evaluated["tokens"] == 127  # every token after the first, once

    # The parent evaluated at the Shape is the same network as the exported folder.
    status, stdout, err = run(capsys, "eval", parent, "--shape", shape, *protocol)
    assert status == 0, err
    assert json.loads(stdout)["perplexity"] == pytest.approx(evaluated["perplexity"], rel=1e-4)

    # The exported folder describes itself, provenance included.
    status, stdout, err = run(capsys, "info", out, "--json")
    assert status == 0, err
    assert json.loads(stdout)["provenance"]["parent"] == str(parent)


def test_extract_overwrite_replaces(capsys, tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    args = ["extract", tiny_dir(PARENT), "--shape", '{"num_hidden_layers": 1}', "--out", out, "--overwrite"]
    status, _, err = run(capsys, *args)
    assert status == 0, err
    assert not (out / "old.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_interrupted_extract_leaves_nothing(capsys, tiny_dir, tmp_path, monkeypatch, overwrite):
    def interrupt(*args, **kwargs):  # Ctrl-C after the weights are written
        raise KeyboardInterrupt

    monkeypatch.setattr("anyshape.export.hf.write_provenance", interrupt)
    parent_folder = tmp_path / "models"
    parent_folder.mkdir()
    out = parent_folder / "small"
    if overwrite:
        out.mkdir()
        (out / "previous.txt").write_text("previous")
    args = ["extract", tiny_dir(PARENT), "--shape", '{"num_hidden_layers": 2}', "--out", out]
    status, _, err = run(capsys, *args, *(["--overwrite"] if overwrite else []))
    assert status == 130
    assert "interrupted" in err
    assert "Traceback" not in err
    assert [p.name for p in parent_folder.iterdir()] == (["small"] if overwrite else [])
    if overwrite:  # the previous folder is untouched
        assert [p.name for p in out.iterdir()] == ["previous.txt"]


# ------------------------------------------------------------------ help teaches

EXAMPLES = {
    "info": "anyshape info smollm2-135m --json",
    "extract": "anyshape extract smollm2-135m --shape '{\"num_hidden_layers\": 20}' --out out/small",
    "evaluate": "anyshape evaluate out/small --ppl --json",
}


@pytest.mark.parametrize("args", [[], ["--help"]], ids=["no-arguments", "help"])
def test_top_level_help(capsys, args):
    status, out, err = run(capsys, *args)
    assert status == 0
    assert err == ""
    assert out.startswith("Usage: anyshape")
    for command, example in EXAMPLES.items():
        assert f"\n  {command} " in out  # listed under Commands
        assert f"\n    {example}\n" in out  # whole, on one line, whatever the terminal width


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_command_help(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "60")  # narrow: the example line must still not wrap
    status, out, err = run(capsys, command, "--help")
    assert status == 0
    assert err == ""
    assert out.startswith(f"Usage: anyshape {command} [OPTIONS]")
    assert f"\n  Example: {EXAMPLES[command]}\n" in out
    assert "MODEL" in out
