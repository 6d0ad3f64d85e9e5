"""Targeted structured pruning on the training loop and `anyshape prune`, on a tiny model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import anyshape
from anyshape.prune.control import PruningControl
from anyshape.prune.lagrangian import Lagrangian
from anyshape.prune.masks import PruningMasks
from anyshape.prune.pipeline import prune
from anyshape.prune.target import PruningTarget
from anyshape.train.checkpoint import load_companion
from anyshape.train.loop import train
from anyshape.train.run import iterate_metrics
from tests.unit.test_cli import assert_bad_input, run
from tests.unit.test_train import (  # noqa: F401 (fixtures)
    PARENT,
    assert_same_state,
    settings,
    text,
    train_in_one_and_two_processes,
    train_interrupted_and_resumed,
)

TARGET = {"num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
          "intermediate_size": 64}  # fmt: skip


@pytest.fixture
def prune_settings(settings):  # noqa: F811
    return replace(
        settings, prune_target=TARGET, sampling="largest", kd="none", steps=300, target_warmup_steps=50,
        lr=1e-3, save_every=300, eval_every=300, val_batches=1,
    )  # fmt: skip


@pytest.mark.integration
def test_expected_sizes_reach_the_target_on_the_loop(prune_settings):
    train(prune_settings, controller=PruningControl)
    history = [record["prune"] for record in iterate_metrics(Path(prune_settings.out)) if "prune" in record]
    first, last = history[0], history[-1]
    for name, size in TARGET.items():
        assert last["target"][name] == pytest.approx(size)
        gap = abs(last["expected"][name] - size) / size
        assert gap < 0.1, f"{name}: expected {last['expected'][name]:.2f}, target {size}"
        assert abs(first["expected"][name] - size) > abs(last["expected"][name] - size)
    assert last["lambda_1"] != [0.0] * 5
    val = [record["val_ppl"] for record in iterate_metrics(Path(prune_settings.out)) if "val_ppl" in record]
    assert "pruned" in val[-1]


def test_killed_and_resumed_pruning_equals_an_uninterrupted_one(prune_settings):
    prune_settings = replace(prune_settings, steps=6, save_every=3, eval_every=6, target_warmup_steps=2)
    reference = train_interrupted_and_resumed(prune_settings, 4, PruningControl)
    _assert_same_pruning(Path(prune_settings.out), Path(reference.out))


def _assert_same_pruning(a: Path, b: Path) -> None:
    config = anyshape.load_config(a)
    target = PruningTarget.from_dict(TARGET, config)
    assert_same_state(anyshape.load(a), anyshape.load(b), atol=1e-5, rtol=1e-4)
    for name, module in [("masks", lambda: PruningMasks(config)), ("lagrangian", lambda: Lagrangian(config, target))]:
        assert_same_state(load_companion(a, name, module()), load_companion(b, name, module()), atol=1e-5, rtol=1e-4)


@pytest.mark.integration
def test_two_processes_prune_like_one(prune_settings):
    prune_settings = replace(prune_settings, steps=3, grad_accum=2, save_every=3, eval_every=3)
    single = train_in_one_and_two_processes(prune_settings, PruningControl)
    _assert_same_pruning(Path(prune_settings.out), Path(single.out))


def test_pruned_model_has_exactly_the_target_shape_and_reloads(prune_settings, tmp_path):
    folder, shape = prune(replace(prune_settings, steps=4, save_every=4, eval_every=4), tmp_path / "sheared")
    config = json.loads((folder / "config.json").read_text())
    assert {name: config[name] for name in TARGET} == TARGET
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in reloaded.parameters()) == shape.num_parameters(anyshape.load_config(folder))
    assert (tmp_path / "sheared" / "run" / "checkpoint").is_dir()


def test_cli_prune_to_a_config_and_bad_targets(capsys, tiny_dir, text, tmp_path):  # noqa: F811
    (tmp_path / "small").mkdir()
    small = dict(json.loads((Path(tiny_dir(PARENT)) / "config.json").read_text()), **TARGET)
    (tmp_path / "small" / "config.json").write_text(json.dumps(small))
    out = tmp_path / "sheared"
    status, stdout, err = run(
        capsys, "prune", tiny_dir(PARENT), "--target-config", tmp_path / "small" / "config.json", "--data", text,
        "--prune-steps", "2", "--seq-len", "32", "--out", out, "--json",
    )  # fmt: skip
    assert status == 0, err
    assert json.loads(stdout)["config"] == TARGET
    status, stdout, err = run(capsys, "prune", "--resume", "--out", out, "--json")  # a finished run: re-finalised
    assert status == 0, err
    assert json.loads(stdout)["config"] == TARGET
    status, _, err = run(capsys, "train", out / "model", "--continue", "--data", text, "--steps", "1",
                         "--seq-len", "32", "--out", tmp_path / "continued")  # fmt: skip
    assert status == 0, err

    base = ["prune", tiny_dir(PARENT), "--data", text, "--out", tmp_path / "bad"]
    assert_bad_input(capsys, [*base, "--target", '{"hidden_size": 128}'], "hidden_size", "128")
    assert_bad_input(capsys, [*base, "--target", '{"num_attention_heads": 3}'], "num_attention_heads")
    assert_bad_input(capsys, [*base], "exactly one of --target and --target-config")
    assert_bad_input(capsys, ["prune", "--resume", "--out", tmp_path / "bad"], "no pruning run to resume")
    assert not (tmp_path / "bad").exists()
