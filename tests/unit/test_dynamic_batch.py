"""Training on several domains with dynamic batch loading (Sheared LLaMA), on a tiny model."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

import anyshape
from anyshape import AnyshapeError
from anyshape.train.loop import train
from anyshape.train.run import iterate_metrics
from anyshape.train.settings import TrainSettings
from tests.unit.test_cli import assert_bad_input, run
from tests.unit.test_train import PARENT, assert_same_state, train_interrupted_and_resumed


@pytest.fixture
def domains(tmp_path, monkeypatch) -> str:
    """Two domains: 'easy' repeats one sentence, 'noise' is random letters."""
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "easy.txt").write_text("the cat sat on the mat. " * 400)
    rng = random.Random(0)
    (tmp_path / "noise.txt").write_text("".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(10_000)))
    return f"easy={tmp_path / 'easy.txt'},noise={tmp_path / 'noise.txt'}"


@pytest.fixture
def settings(tiny_dir, domains, tmp_path) -> TrainSettings:
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"easy": 9.0, "noise": 0.5}))  # noise is far above its reference
    return TrainSettings(
        model=str(tiny_dir(PARENT)), domains=domains, dynamic_batch=True, reference_losses=str(reference),
        domain_update_every=2, sampling="largest", kd="none", out=str(tmp_path / "run"), steps=6, seq_len=32,
        batch_size=4, align=16, fractions=(0.5, 1.0), save_every=3, eval_every=3, warmup_steps=1, lr=1e-3,
    )  # fmt: skip


def test_a_domain_far_above_its_reference_gains_weight(settings):
    train(settings)
    updates = [record["domains"] for record in iterate_metrics(Path(settings.out)) if "domains" in record]
    assert len(updates) == 3  # steps 2, 4, 6
    for update in updates:
        assert sum(update["weights"].values()) == pytest.approx(1.0)
        assert update["reference"] == {"easy": 9.0, "noise": 0.5}
    assert updates[0]["weights"]["noise"] > 0.9 > updates[0]["weights"]["easy"]
    assert updates[0]["loss"]["noise"] > 0.5 > 0 and updates[0]["loss"]["easy"] < 9.0
    history = json.loads((Path(settings.out) / "checkpoint" / "state.json").read_text())["domains"]["history"]
    assert [entry["batch"] for entry in history] == [0, 2, 4, 6]


def test_killed_and_resumed_domain_run_equals_an_uninterrupted_one(settings):
    reference = train_interrupted_and_resumed(settings, 3)
    states = [json.loads((Path(r.out) / "checkpoint" / "state.json").read_text()) for r in (settings, reference)]
    assert states[0]["domains"] == states[1]["domains"]
    assert_same_state(anyshape.load(settings.out), anyshape.load(reference.out))


def test_reference_losses_from_a_reference_model(settings):
    run_settings = replace(settings, reference_losses=None, reference_model=settings.model, steps=2)
    train(run_settings)
    update = next(record["domains"] for record in iterate_metrics(Path(run_settings.out)) if "domains" in record)
    # the parent is the reference: its losses are the references, so step 2's losses are close to them
    assert set(update["reference"]) == {"easy", "noise"}
    assert all(abs(update["loss"][k] - update["reference"][k]) < 1.0 for k in update["reference"])


def test_bad_domain_settings_fail_before_a_run_folder_exists(settings, tmp_path):
    for change, words in [
        ({"dynamic_batch": True, "domains": None, "data": settings.model}, "--dynamic-batch reweights domains"),
        ({"reference_model": "x"}, "exactly one of --reference-losses"),
        ({"data": "x.txt"}, "either as --data or as --domains"),
        ({"domains": "easy"}, "has no '='"),
    ]:
        with pytest.raises(AnyshapeError, match=words):
            train(replace(settings, **change))
    (tmp_path / "partial.json").write_text(json.dumps({"easy": 1.0}))
    with pytest.raises(AnyshapeError, match="noise"):
        train(replace(settings, reference_losses=str(tmp_path / "partial.json")))
    assert not Path(settings.out).exists()


def test_cli_continue_with_dynamic_batch(capsys, settings, tmp_path):
    status, stdout, err = run(
        capsys, "train", settings.model, "--continue", "--dynamic-batch", "--domains", settings.domains,
        "--reference-losses", settings.reference_losses, "--domain-update-every", "1", "--steps", "2",
        "--seq-len", "32", "--out", tmp_path / "cli", "--json",
    )  # fmt: skip
    assert status == 0, err
    assert set(json.loads(stdout)["loss"]) == {"largest"}
    assert_bad_input(
        capsys, ["train", settings.model, "--dynamic-batch", "--domains", settings.domains, "--out", tmp_path / "x"],
        "exactly one of --reference-losses",
    )  # fmt: skip
