"""`anyshape compress` and `anyshape search` end to end on a tiny random model."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import anyshape
from anyshape.compress.baselines import single_axis_shapes
from anyshape.compress.pipeline import CompressSettings, compress
from anyshape.search.pareto import dominates
from tests.conftest import assert_png
from tests.unit.test_cli import assert_bad_input, run

PARENT = "llama3-gqa"  # 4 layers, hidden 64, 8 query heads in 2 KV groups, MLP 96, untied
SMALL = [
    "--num-sequences", "4", "--sequence-length", "32", "--search-sequences", "2", "--search-length", "32",
    "--trials", "5", "--eval-tokens", "512", "--budgets", "0.5,0.8",
]  # fmt: skip
SETTINGS = CompressSettings(
    budgets=(0.5, 0.8), num_sequences=4, sequence_length=32, search_sequences=2, search_length=32, trials=5,
    eval_tokens=512,
)  # fmt: skip


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    sentences = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."]
    path.write_text(" ".join(sentences[i % 2] + f" {i}" for i in range(400)))
    return path


def test_family_members_reload_with_the_reported_parameter_counts(capsys, tiny_dir, text, tmp_path):
    out = tmp_path / "family"
    status, stdout, err = run(capsys, "compress", tiny_dir(PARENT), "--out", out, "--data", text, *SMALL, "--json")
    assert status == 0, err
    printed = json.loads(stdout)
    summary = json.loads((out / "summary.json").read_text())
    assert [m["folder"] for m in summary["members"]] == ["0.5", "0.8"]
    assert (out / "report.md").read_text().startswith("# ")
    assert_png(out / "pareto.png")
    assert not list(tmp_path.glob(".*partial*")), "the work folder must become the family"
    parent = anyshape.load(tiny_dir(PARENT))
    full = parent.full_shape.num_parameters(parent.config)
    for member, shown in zip(summary["members"], printed["members"], strict=True):
        reloaded = AutoModelForCausalLM.from_pretrained(out / member["folder"])
        assert sum(p.numel() for p in reloaded.parameters()) == member["num_parameters"] == shown["num_parameters"]
        assert (1 - SETTINGS.band) * member["budget"] * full <= member["num_parameters"] <= member["budget"] * full
        provenance = json.loads((out / member["folder"] / "anyshape.json").read_text())
        assert provenance["shape"] == member["shape"] and provenance["budget"] == member["budget"]
        assert provenance["parent_shape"] == parent.full_shape.to_dict()
        for baseline in member["baselines"].values():
            assert baseline is None or baseline["num_parameters"] <= member["budget"] * full


def test_rerun_with_the_same_settings_does_nothing(tiny_dir, text, tmp_path):
    settings = CompressSettings(**{**SETTINGS.__dict__, "data": str(text)})
    first = compress(str(tiny_dir(PARENT)), tmp_path / "family", settings)
    messages = []
    again = compress(str(tiny_dir(PARENT)), tmp_path / "family", settings, log=messages.append)
    assert again == first and messages == [f"{tmp_path / 'family'} is up to date with these settings; nothing to do"]


def test_changed_settings_need_overwrite_and_reuse_unchanged_stages(capsys, tiny_dir, text, tmp_path):
    settings = CompressSettings(**{**SETTINGS.__dict__, "data": str(text)})
    compress(str(tiny_dir(PARENT)), tmp_path / "family", settings)
    more_trials = CompressSettings(**{**settings.__dict__, "trials": 6})
    with pytest.raises(anyshape.AnyshapeError, match="--overwrite"):
        compress(str(tiny_dir(PARENT)), tmp_path / "family", more_trials)
    summary = compress(str(tiny_dir(PARENT)), tmp_path / "family", more_trials, overwrite=True)
    reused = {stage: timing["reused"] for stage, timing in summary["stages"].items()}
    assert reused["scores"] and reused["layers"] and reused["eval-parent"]
    assert not reused["search-0.5"] and not reused["search-0.8"]


@pytest.mark.integration
def test_killed_run_resumes_and_reuses_finished_stages(tiny_dir, text, tmp_path):
    out = tmp_path / "family"
    command = [sys.executable, "-m", "anyshape", "compress", str(tiny_dir(PARENT)), "--out", str(out),
               "--data", str(text), *SMALL]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    marker = tmp_path / ".family.partial" / "stages" / "search-0.5.key"
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not out.exists(), "a killed run must not leave a family that looks complete"
    settings = CompressSettings(**{**SETTINGS.__dict__, "data": str(text)})
    summary = compress(str(tiny_dir(PARENT)), out, settings)
    assert summary["stages"]["scores"]["reused"] and summary["stages"]["search-0.5"]["reused"]
    assert not summary["stages"]["eval-parent"]["reused"]
    assert (out / "summary.json").is_file() and not (tmp_path / ".family.partial").exists()


def test_impossible_budget_names_the_smallest_reachable_one(capsys, tiny_dir, tmp_path):
    assert_bad_input(
        capsys, ["compress", tiny_dir(PARENT), "--out", tmp_path / "f", "--budgets", "0.01"],
        "budget 0.01", "smallest reachable budget is 0.115", "smaller --align",
    )  # fmt: skip
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--budgets", "half"], ["--budgets", "comma-separated"]),
        (["--budgets", "0.5,1.5"], ["budgets", "(0, 1]"]),
        (["--budget-basis", "embedding"], ["budget basis", "non-embedding"]),
        (["--depth-method", "best"], ["depth method", "dp"]),
        (["--fractions", "0,0.5"], ["fractions", "(0, 1]"]),
    ],
)
def test_bad_compress_options(capsys, tiny_dir, tmp_path, args, words):
    assert_bad_input(capsys, ["compress", tiny_dir(PARENT), "--out", tmp_path / "f", *args], *words)


def test_single_axis_heuristics_are_the_largest_that_fit(tiny_dir):
    model = anyshape.load(tiny_dir(PARENT))
    config = model.config
    budget = 0.6 * model.full_shape.num_parameters(config)
    shapes = single_axis_shapes(config, budget, True, [3, 0, 2, 1], align=1)
    assert shapes["depth-only"].layers == (0, 3)
    assert shapes["mlp-only"] is None  # attention and embeddings alone exceed 60%
    hidden = shapes["hidden-only"]
    assert hidden.num_parameters(config) <= budget
    bigger = anyshape.Shape(hidden.layers, hidden.hidden_size + 1, 8, 2, 96)
    assert bigger.num_parameters(config) > budget


def test_single_axis_heuristics_keep_widths_aligned(tiny_dir):
    config = dataclasses.replace(anyshape.load_config(tiny_dir(PARENT)), hidden_size=256, intermediate_size=1000)
    full = anyshape.Shape.full(config)
    budget = 0.6 * full.num_parameters(config, embeddings=False)
    for align in (1, 32):
        shapes = single_axis_shapes(config, budget, False, [0, 1, 2, 3], align)
        mlp, hidden = shapes["mlp-only"], shapes["hidden-only"]
        assert mlp.intermediate_size % align == 0 and hidden.hidden_size % align == 0
        for shape, axis in ((mlp, "intermediate_size"), (hidden, "hidden_size")):
            assert shape.num_parameters(config, embeddings=False) <= budget
            wider = dataclasses.replace(shape, **{axis: getattr(shape, axis) + align})
            assert wider.num_parameters(config, embeddings=False) > budget  # the largest that fits


def test_search_command_writes_a_front_within_the_bounds(capsys, tiny_dir, text, tmp_path):
    out = tmp_path / "pareto.json"
    args = ["search", tiny_dir(PARENT), "--objectives", "params,flops,ppl", "--trials", "8", "--max-params", "120k",
            "--data", text, "--num-sequences", "2", "--sequence-length", "32", "--out", out, "--json"]  # fmt: skip
    status, stdout, err = run(capsys, *args)
    assert status == 0, err
    result = json.loads(out.read_text())
    assert len(result["evaluated"]) == 8 and all(row["params"] <= 120_000 for row in result["evaluated"])
    front = [(row["params"], row["flops"], row["ppl"]) for row in result["pareto_front"]]
    assert front and not any(dominates(a, b) for a in front for b in front)
    assert json.loads(stdout)["pareto_front"] == result["pareto_front"]
    assert_png(out.with_suffix(".png"))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--objectives", "params"], ["--objectives", "one quality"]),
        (["--objectives", "params,ppl,kd"], ["--objectives", "one quality"]),
        (["--objectives", "speed,ppl"], ["--objectives", "latency"]),
        (["--algorithm", "grid"], ["--algorithm", "nsga2"]),
        (["--max-params", "lots"], ["--max-params", "60M"]),
        (["--max-params", "1k"], ["--max-params", "smallest has"]),
    ],
)
def test_bad_search_options(capsys, tiny_dir, tmp_path, args, words):
    assert_bad_input(capsys, ["search", tiny_dir(PARENT), "--out", tmp_path / "p.json", *args], *words)


def test_the_member_is_the_best_compensated_candidate(tiny_dir, text, tmp_path):
    settings = CompressSettings(
        **{**SETTINGS.__dict__, "data": str(text), "compensate": "on", "trials": 2, "candidates": 5}
    )
    summary = compress(str(tiny_dir(PARENT)), tmp_path / "family", settings)
    parent = anyshape.load(tiny_dir(PARENT))
    full = parent.full_shape.num_parameters(parent.config)
    for member in summary["members"]:
        tried = member["candidates"]
        best = min(tried, key=lambda c: c["check_ppl"]["compensated"])
        assert (member["shape"], member["source"], member["check_ppl"]) == (
            best["shape"], best["source"], best["check_ppl"]
        )  # fmt: skip
        plain = [c["check_ppl"]["plain"] for c in tried]
        assert plain == sorted(plain), "the candidates are those of lowest plain proxy perplexity, in order"
        ranking = json.loads((tmp_path / "family" / "stages" / "layers.json").read_text())["ranking"]
        heuristics = single_axis_shapes(parent.config, member["budget"] * full, True, ranking)
        in_band = {
            name: shape.to_dict()
            for name, shape in heuristics.items()
            if shape is not None
            and shape.num_parameters(parent.config) >= (1 - settings.band) * member["budget"] * full
        }
        assert all(shape in [c["shape"] for c in tried] for shape in in_band.values())  # as itself or as searched
        assert {c["source"] for c in tried} <= {"search", *in_band}
