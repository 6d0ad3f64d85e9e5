"""`anyshape compress` and `anyshape search` end to end on a tiny random model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import anyshape
from anyshape.cli.calibration import read_calibration
from anyshape.compress.baselines import single_axis_shapes
from anyshape.compress.pipeline import CompressSettings, compress
from anyshape.compress.stages import StageCache
from anyshape.data.text import load_text
from anyshape.evaluate.perplexity import perplexity
from anyshape.export.extract import extract_state_dict
from anyshape.export.hf import export_hf
from anyshape.importance.permute import sort_
from anyshape.importance.scores import Scores
from anyshape.search.objectives import Quality
from anyshape.search.pareto import dominates
from anyshape.search.space import SearchSpace
from anyshape.shape import Shape
from anyshape.train.loop import train, training_space
from anyshape.train.settings import TrainSettings
from tests.conftest import assert_png
from tests.unit.test_cli import assert_bad_input, run

PARENT = "llama3-gqa"  # 4 layers, hidden 64, 8 query heads in 2 KV groups, MLP 96, untied
SMALL = [
    "--num-sequences", "4", "--sequence-length", "32", "--search-sequences", "2", "--search-length", "32",
    "--trials", "5", "--eval-tokens", "512", "--budgets", "0.5,0.8",
    "--train-tokens", "1024", "--train-seq-len", "32", "--train-batch-size", "4", "--train-lr", "0.001",
    "--train-text", "data",
]  # fmt: skip
SETTINGS = CompressSettings(
    budgets=(0.5, 0.8), num_sequences=4, sequence_length=32, search_sequences=2, search_length=32, trials=5,
    eval_tokens=512, train_tokens=1024, train_seq_len=32, train_batch_size=4, train_lr=0.001, train_text="data",
)  # fmt: skip


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    sentences = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs."]
    path.write_text(" ".join(sentences[i % 2] + f" {i}" for i in range(400)))
    return path


@pytest.fixture(scope="module")
def taught(tiny_dir, text, tmp_path_factory) -> Path:
    """The tiny parent after 60 steps of next-token training on `text`: a parent with something
    to lose when cut, and so something for distillation to recover."""
    run = tmp_path_factory.mktemp("teach") / "run"
    train(
        TrainSettings(
            model=str(tiny_dir(PARENT)), data=str(text), out=str(run), sampling="largest", kd="none", steps=60,
            lr=3e-3, seq_len=32, batch_size=8, warmup_steps=5, eval_every=60, save_every=60,
        )
    )  # fmt: skip
    out = tmp_path_factory.mktemp("taught") / "model"
    model = anyshape.load(run)
    export_hf(model, model.full_shape, out, anyshape.load_tokenizer(tiny_dir(PARENT)))
    return out


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


def kill_compress_when(marker: Path, tiny_dir, text: Path, cwd: Path) -> None:
    """Runs `anyshape compress` into cwd/family in a process, SIGKILLed as `marker` (relative to
    cwd) appears."""
    command = [sys.executable, "-m", "anyshape", "compress", str(tiny_dir(PARENT)), "--out", "family",
               "--data", str(text), *SMALL]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=cwd)
    deadline = time.monotonic() + 120
    while not (cwd / marker).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.integration
def test_killed_run_resumes_and_reuses_finished_stages(tiny_dir, text, tmp_path):
    out = tmp_path / "family"
    kill_compress_when(Path(".family.partial", "stages", "search-0.5.key"), tiny_dir, text, tmp_path)
    assert not out.exists(), "a killed run must not leave a family that looks complete"
    settings = CompressSettings(**{**SETTINGS.__dict__, "data": str(text)})
    summary = compress(str(tiny_dir(PARENT)), out, settings)
    assert summary["stages"]["scores"]["reused"] and summary["stages"]["search-0.5"]["reused"]
    assert not summary["stages"]["eval-parent"]["reused"]
    assert (out / "summary.json").is_file() and not (tmp_path / ".family.partial").exists()


@pytest.fixture(scope="module")
def trained_family(taught, text, tmp_path_factory) -> tuple[Path, dict]:
    """A family of the taught parent, trained on 4,096 tokens, uncompensated: (folder, summary)."""
    out = tmp_path_factory.mktemp("trained") / "family"
    settings = dataclasses.replace(SETTINGS, data=str(text), compensate="off", train_tokens=4096)
    return out, compress(str(taught), out, settings)


def test_members_are_trained_slices_of_the_elastic_model(taught, text, trained_family):
    out, summary = trained_family
    elastic = anyshape.load(out / "elastic")  # a MODEL like any other
    parent = anyshape.load(taught)
    sort_(parent, Scores.load(out / "stages" / "scores.safetensors", parent.config))  # as compress cut it
    tokenizer = anyshape.load_tokenizer(taught)
    eval_ids = torch.tensor(tokenizer(load_text(str(text)), add_special_tokens=False)["input_ids"][:512])
    assert summary["training"]["tokens"] == 4096 and summary["training"]["steps"] == 32
    assert not any(torch.equal(a, b) for a, b in zip(elastic.parameters(), parent.parameters(), strict=True) if a.ndim)
    for member in summary["members"]:
        shape = Shape.from_dict(member["shape"], elastic.config)
        exported = load_file(out / member["folder"] / "model.safetensors")
        expected = extract_state_dict(elastic, shape)
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[name], expected[name]) for name in expected), "cut from OUT/elastic"
        zero_shot = Shape.from_dict(member["zero_shot"]["shape"], parent.config)
        assert member["zero_shot"]["ppl"] == pytest.approx(perplexity(parent, eval_ids, zero_shot).perplexity)
        assert member["ppl"] < member["zero_shot"]["ppl"], "distillation from the parent recovers what cutting lost"
    held_out = summary["training"]["held_out_ppl"]
    assert held_out["after"]["smallest"] < held_out["before"]["smallest"]  # sizes besides the members learn too
    assert (out / "elastic" / "importance.safetensors").is_file() and not (out / "stages" / "train-run").exists()


def test_the_elastic_run_samples_the_layers_compress_ranked(monkeypatch, tiny_dir, text, tmp_path):
    class Started(Exception):
        pass

    def started(settings, **_):
        spaces.append(training_space(settings, anyshape.load_config(settings.model)))
        raise Started

    spaces: list[SearchSpace] = []
    monkeypatch.setattr("anyshape.compress.training.train", started)
    with pytest.raises(Started):
        compress(str(tiny_dir(PARENT)), tmp_path / "family", dataclasses.replace(SETTINGS, data=str(text)))
    ranking = StageCache(tmp_path / ".family.partial" / "stages").read("layers")["ranking"]
    assert ranking != sorted(ranking), "a ranking that keeps the first layers could not tell"
    expected = SearchSpace.from_fractions(spaces[0].config, SETTINGS.fractions, ranking, SETTINGS.align)
    assert spaces[0].layer_sets == expected.layer_sets


def test_text_sampled_from_the_parent_trains_the_family_without_a_corpus(taught, text, tmp_path):
    settings = dataclasses.replace(SETTINGS, data=str(text), compensate="off", train_tokens=4096, train_text="parent")
    with pytest.raises(anyshape.AnyshapeError, match="no beginning- or end-of-sequence token"):
        compress(str(taught), tmp_path / "family", settings)  # before any stage runs
    assert not (tmp_path / ".family.partial").exists()
    parent = tmp_path / "parent"
    shutil.copytree(taught, parent)
    tokenizer = anyshape.load_tokenizer(parent)
    tokenizer.bos_token = "!"
    tokenizer.save_pretrained(parent)
    messages: list[str] = []
    summary = compress(str(parent), tmp_path / "family", settings, log=messages.append)
    assert any("sampling 4,096 tokens of text from the parent" in message for message in messages)
    for member in summary["members"]:
        assert member["ppl"] < member["zero_shot"]["ppl"], "the parent's own text teaches what cutting lost"


def test_any_budget_extracts_from_the_elastic_model_as_its_best_searched_shape(capsys, text, trained_family, tmp_path):
    out, _ = trained_family
    status, stdout, err = run(
        capsys, "extract", out / "elastic", "--budget", "0.65", "--data", text, "--out", tmp_path / "m", "--json"
    )
    assert status == 0, err
    elastic = anyshape.load(out / "elastic")
    shape = Shape.from_dict(json.loads(stdout)["shape"], elastic.config)
    parent_params = elastic.full_shape.num_parameters(elastic.config)
    assert 0.9 * 0.65 * parent_params <= shape.num_parameters(elastic.config) <= 0.65 * parent_params  # the band
    exported = load_file(tmp_path / "m" / "model.safetensors")
    assert all(torch.equal(exported[name], tensor) for name, tensor in extract_state_dict(elastic, shape).items())
    record = json.loads((tmp_path / "m" / "anyshape.json").read_text())
    windows = read_calibration(str(out / "elastic"), text, 8, 256, seed=0)
    child = anyshape.load(tmp_path / "m")
    assert record["budget"] == 0.65 and record["search_ppl"] == pytest.approx(Quality(child, windows)(child.full_shape))
    assert_bad_input(capsys, ["extract", tmp_path / "m", "--budget", "0.5", "--out", tmp_path / "n"], "elastic/")


@pytest.mark.integration
def test_training_killed_mid_run_resumes_to_the_uninterrupted_weights(tiny_dir, text, tmp_path):
    out = tmp_path / "family"
    checkpoint = Path(".family.partial", "stages", "train-run", "checkpoint", "state.json")
    kill_compress_when(checkpoint, tiny_dir, text, tmp_path)
    settings = dataclasses.replace(SETTINGS, data=str(text))
    messages: list[str] = []
    resumed = compress(str(tiny_dir(PARENT)), out, settings, log=messages.append)
    assert any("resuming" in message for message in messages), "the run continues from its checkpoint"
    whole = compress(str(tiny_dir(PARENT)), tmp_path / "whole", settings)
    assert [(m["shape"], m["ppl"]) for m in resumed["members"]] == [(m["shape"], m["ppl"]) for m in whole["members"]]
    assert resumed["training"]["held_out_ppl"] == whole["training"]["held_out_ppl"]
    first = load_file(out / "elastic" / "model.safetensors")
    second = load_file(tmp_path / "whole" / "elastic" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_no_training_tokens_make_the_zero_shot_family(tiny_dir, text, tmp_path):
    out = tmp_path / "family"
    settings = dataclasses.replace(SETTINGS, data=str(text), compensate="off", train_tokens=0)
    summary = compress(str(tiny_dir(PARENT)), out, settings)
    assert "training" not in summary and not (out / "elastic").exists()
    assert not any(name.startswith("search-trained") for name in summary["stages"])
    parent = anyshape.load(tiny_dir(PARENT))
    sort_(parent, Scores.load(out / "stages" / "scores.safetensors", parent.config))
    for member in summary["members"]:
        shape = Shape.from_dict(member["shape"], parent.config)
        exported = load_file(out / member["folder"] / "model.safetensors")
        expected = extract_state_dict(parent, shape)
        assert all(torch.equal(exported[name], expected[name]) for name in expected), "cut from the sorted parent"
        assert "zero_shot" not in member


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
        (["--train-tokens", "-1"], ["--train-tokens", "greater than or equal to 0"]),
        (["--train-lr", "0"], ["train_lr=0", "positive"]),
        (["--train-text", "corpus"], ["train text", "parent"]),
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
