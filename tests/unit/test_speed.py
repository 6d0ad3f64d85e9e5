"""`anyshape bench`: every runtime computes the model it claims to time (its cached logits equal
the elastic model's), rates and memory are measured and written as JSON, CSV and PNG, for one
model at a Shape and for a family; bad input exits 2."""

import csv
import json
import shutil

import pytest
import torch

import anyshape
from anyshape import Shape, export_hf
from anyshape.deploy.speed import (
    AnyshapeRuntime,
    LlamaCppRuntime,
    SpeedSettings,
    TransformersRuntime,
    _peak_memory,
    llama_cpp_missing,
)
from anyshape.export.gguf import export_gguf
from tests.conftest import assert_png, byte_tokenizer
from tests.unit.test_cli import assert_bad_input, run
from tests.unit.test_gguf import bpe_tokenizer

SHAPE = '{"layers": [0, 1, 3], "hidden_size": 48, "num_key_value_heads": 1, "num_attention_heads": 4}'
FAST = ["--prompt-tokens", 8, "--gen-tokens", 4, "--repeats", 2, "--warmup", 0]
IDS = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(4)).tolist()


def runtime_logits(runtime) -> torch.Tensor:
    """Logits (5, V) of a runtime: after an 8-token prefill, then after each of 4 decode steps."""
    rows = [runtime.prefill(IDS[:8]).clone()]
    rows += [runtime.decode(token).clone() for token in IDS[8:]]
    return torch.stack(rows).float()


def elastic_logits(model, shape: Shape) -> torch.Tensor:
    """What the runtimes must compute: the full forward's logits at positions 7..11."""
    with torch.no_grad():
        return model(torch.tensor([IDS]), shape)[0, 7:]


@pytest.mark.parametrize("name", ["llama3-gqa", "mistral-window", "qwen2-gqa"])
def test_the_runtimes_compute_the_model_with_their_caches(tiny_dir, tmp_path, name):
    model = anyshape.load(tiny_dir(name))
    shape = Shape.parse(SHAPE if name == "llama3-gqa" else '{"layers": [0, 2]}', model.config)
    expected = elastic_logits(model, shape)
    export_hf(model, shape, tmp_path / "hf")
    torch.testing.assert_close(runtime_logits(AnyshapeRuntime(str(tiny_dir(name)), shape)), expected)
    torch.testing.assert_close(runtime_logits(TransformersRuntime(tmp_path / "hf")), expected, atol=1e-4, rtol=0)


def test_llama_cpp_runs_the_exported_gguf(tiny_dir, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    model = anyshape.load(tiny_dir("llama3-gqa"))
    shape = Shape.parse(SHAPE, model.config)
    gguf = export_gguf(model, shape, tmp_path / "model.gguf", bpe_tokenizer(), outtype="f32")
    runtime = LlamaCppRuntime(gguf, SpeedSettings(prompt_tokens=8, gen_tokens=4))
    torch.testing.assert_close(runtime_logits(runtime), elastic_logits(model, shape), atol=1e-3, rtol=1e-3)


def test_peak_memory_sees_an_allocation():
    with _peak_memory() as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, so resident
        del block
    if "mib" not in peak:
        pytest.skip("/proc/self/clear_refs is not writable here")
    assert 60 < peak["mib"] < 200


def assert_measured(record: dict, models: list[str]) -> None:
    """Each model has a result for every runtime not skipped, with positive, ordered rates."""
    runtimes = {"anyshape", "transformers", "llama.cpp"}
    for model in models:
        measured = {r["runtime"] for r in record["results"] if r["model"] == model}
        skipped = {s["runtime"] for s in record["skipped"] if s["model"] == model}
        assert measured | skipped == runtimes and not measured & skipped
        assert {"anyshape", "transformers"} <= measured
    for result in record["results"]:
        for phase in ("prefill", "decode"):
            rate = result[phase]
            assert 0 < rate["min"] <= rate["median"] <= rate["max"]
        assert result["peak_rss_mib"] is None or result["peak_rss_mib"] >= 0
    for skip in record["skipped"]:
        assert skip["runtime"] == "llama.cpp" and skip["reason"]


def test_bench_a_shape_writes_json_csv_and_plot(capsys, tiny_dir, tmp_path):
    folder = tiny_dir("llama3-gqa")
    args = ["bench", folder, "--shape", SHAPE, *FAST, "--csv", tmp_path / "speed.csv", "--plot", tmp_path / "s.png"]
    status, out, err = run(capsys, *args, "--json")
    assert status == 0, err
    record = json.loads(out)
    assert record["shape"]["hidden_size"] == 48
    assert record["settings"]["prompt_tokens"] == 8 and record["settings"]["gen_tokens"] == 4
    assert_measured(record, [str(folder)])
    if llama_cpp_missing() is not None:
        assert "not installed" in record["skipped"][0]["reason"]
    rows = list(csv.DictReader(open(tmp_path / "speed.csv")))
    assert [row["runtime"] for row in rows] == [r["runtime"] for r in record["results"]]
    assert float(rows[0]["decode_tok_s_median"]) == pytest.approx(record["results"][0]["decode"]["median"])
    assert_png(tmp_path / "s.png")


def test_bench_a_family_measures_every_member(capsys, tiny_dir, tmp_path):
    parent = anyshape.load(tiny_dir("qwen2-gqa"))
    family = tmp_path / "family"
    for name, fields in {"0.5": {"num_hidden_layers": 2}, "0.25": {"layers": [0], "intermediate_size": 48}}.items():
        export_hf(parent, Shape.from_dict(fields, parent.config), family / name, tokenizer=byte_tokenizer())
    (family / "summary.json").write_text(json.dumps({"members": [{"folder": "0.5"}, {"folder": "0.25"}]}))
    status, out, err = run(capsys, "bench", family, *FAST, "--runtime", "anyshape", "--runtime", "transformers")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("batch 1, 8 prompt tokens, 4 decoded")
    assert [line.split()[:2] for line in lines[2:]] == [
        ["0.5", "anyshape"],
        ["0.5", "transformers"],
        ["0.25", "anyshape"],
        ["0.25", "transformers"],
    ]
    status, out, err = run(capsys, "bench", family, *FAST, "--json", "--plot", tmp_path / "family.png")
    assert status == 0, err
    assert_measured(json.loads(out), ["0.5", "0.25"])
    assert_png(tmp_path / "family.png")

    shutil.rmtree(family / "0.25")
    assert_bad_input(capsys, ["bench", family, *FAST], "not a complete family", "0.25", "config.json")
    assert_bad_input(capsys, ["bench", family, "--shape", SHAPE], "family", "--shape", "one member folder")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--prompt-tokens", "0"], ["--prompt-tokens", "greater than or equal to 1"]),
        (["--gen-tokens", "0"], ["--gen-tokens", "greater than or equal to 1"]),
        (["--warmup", "-1"], ["--warmup", "greater than or equal to 0"]),
        (["--runtime", "vllm"], ["--runtime", "'vllm'", "anyshape, transformers, llama.cpp"]),
        (["--gguf-type", "q4_k"], ["gguf_type 'q4_k'", "q8_0"]),
        (["--csv", "no/such/folder/speed.csv"], ["--csv", "does not exist"]),
    ],
    ids=["prompt-tokens", "gen-tokens", "warmup", "runtime", "gguf-type", "csv-folder"],
)
def test_bad_bench_input_exits_2(capsys, tiny_dir, args, words):
    assert_bad_input(capsys, ["bench", tiny_dir("qwen2-gqa"), *args], *words)


def test_bench_a_missing_model_exits_2(capsys, tmp_path):
    assert_bad_input(capsys, ["bench", tmp_path / "family", "--prompt-tokens", 8], "not found")


def test_bench_help_names_the_runtimes(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # narrow: the example line must still not wrap
    status, out, err = run(capsys, "bench", "--help")
    assert status == 0 and err == ""
    assert out.startswith("Usage: anyshape bench [OPTIONS] {MODEL_OR_FAMILY}")
    assert "\n  Example: anyshape bench family/ --prompt-tokens 512 --gen-tokens 128 --json\n" in out
    for option in ("--prompt-tokens", "--gen-tokens", "--repeats", "--warmup", "--runtime", "--csv", "--plot"):
        assert option in out
