"""`anyshape train` on a tiny model: options, config files, resume, the run as a MODEL, bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyshape
from anyshape import Shape
from tests.unit.test_cli import assert_bad_input, run

PARENT = "llama3-gqa"  # 4 layers, hidden 64, 8 query heads in 2 KV groups, MLP 96, context 256
SMALL = '{"layers": [0, 1], "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2}'


@pytest.fixture
def text(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "train.txt"
    path.write_text(" ".join(f"Line {i} counts to {i % 9}." for i in range(400)))
    return path


def quick(tiny_dir, text, run_dir, *extra) -> list:
    return ["train", tiny_dir(PARENT), "--data", text, "--out", run_dir, "--steps", "2", "--seq-len", "32",
            "--align", "16", "--fractions", "0.5,1", "--save-every", "1", *extra]  # fmt: skip


def test_train_writes_a_run_that_every_command_reads(capsys, tiny_dir, text, tmp_path):
    run_dir = tmp_path / "run"
    status, stdout, err = run(capsys, *quick(tiny_dir, text, run_dir, "--adapter", "lora", "--lr", "0.01", "--json"))
    assert status == 0, err
    record = json.loads(stdout)
    assert record["step"] == 2 and set(record["val_ppl"]) == {"largest", "smallest"}
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 3  # step 0 (zero-shot), 1, 2

    status, stdout, err = run(capsys, "evaluate", run_dir, "--shape", SMALL, "--data", text, "--ppl", "--json")
    assert status == 0, err
    status, _, err = run(capsys, "extract", run_dir, "--shape", SMALL, "--out", tmp_path / "small")
    assert status == 0, err
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    model = anyshape.load(run_dir)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        shape = Shape.parse(SMALL, model.config)
        torch.testing.assert_close(reloaded(ids).logits, model(ids, shape), atol=1e-5, rtol=1e-5)


def test_config_file_with_command_line_overrides_and_resume(capsys, tiny_dir, text, tmp_path):
    config = tmp_path / "elastic.yaml"
    config.write_text(f"model: {tiny_dir(PARENT)}\nsteps: 3\nseq_len: 32\nalign: 16\nkd: js\nbatch_size: 2\n")
    run_dir = tmp_path / "run"
    status, _, err = run(capsys, "train", "--config", config, "--data", text, "--out", run_dir, "--steps", "2")
    assert status == 0, err
    settings = json.loads((run_dir / "train.json").read_text())["settings"]
    assert (settings["steps"], settings["kd"], settings["batch_size"]) == (2, "js", 2)
    assert settings["data"] == str(text.resolve())
    status, _, err = run(capsys, "train", "--resume", run_dir, "--save-every", "5")
    assert status == 0, err
    assert "resuming" in err and "step 2 of 2" in err
    assert_bad_input(capsys, ["train", "--resume", run_dir, "--lr", "0.5"], "other settings", "lr")


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"empty": True}, ["contains no text"]),
        (["--seq-len", "1000"], ["seq_len=1000", "context of 256", "--seq-len 256"]),
        (["--sampling", "fixed", "--shapes", '[{"hidden_size": 1000}]'], ["hidden_size", "1000"]),
        (["--sampling", "fixed"], ["--shapes"]),
        (["--kd", "kl"], ["unknown kd 'kl'", "forward-kl"]),
        (["--adapter", "dora"], ["unknown adapter", "lora"]),
        (["--batch-size", "3", "--grad-accum", "2"], ["multiple of grad_accum"]),
        (["--shapes", "{oops"], ["--shapes", "JSON"]),
    ],
)
def test_bad_training_input(capsys, tiny_dir, text, tmp_path, change, words):
    if change == {"empty": True}:
        text.write_text("")
        change = []
    assert_bad_input(capsys, quick(tiny_dir, text, tmp_path / "run", *change), *words)
    assert not (tmp_path / "run" / "train.json").exists(), "bad input must leave no run behind"


def test_bad_config_and_occupied_out(capsys, tiny_dir, text, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("stepz: 3\n")
    assert_bad_input(capsys, ["train", "--config", config], "unknown setting(s) stepz", "steps")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    assert_bad_input(capsys, quick(tiny_dir, text, occupied), "not empty", "--overwrite")
    assert_bad_input(capsys, ["train", "--resume", tmp_path / "nowhere"], "not a run folder")


def test_train_help_teaches(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    status, out, err = run(capsys, "train", "--help")
    assert status == 0 and err == ""
    for line in (
        "anyshape train smollm2-135m --data train.txt --out run/ --steps 200 --seq-len 256",
        "anyshape train --config recipes/smollm2-135m/elastic.yaml --resume run/",
        "torchrun --nproc_per_node 2 -m anyshape train --config recipes/smollm2-135m/elastic.yaml",
    ):
        assert f"\n    {line}\n" in out  # whole, on one line, whatever the terminal width
    for option in ("--sampling", "--kd", "--adapter", "--balance-losses", "--distributed", "--resume"):
        assert option in out


def test_a_dry_run_prints_the_memory_plan_and_trains_nothing(capsys, tiny_dir, text, tmp_path):
    run_dir = tmp_path / "run"
    status, stdout, err = run(capsys, *quick(tiny_dir, text, run_dir, "--dry-run", "--json"))
    assert status == 0, err
    plan = json.loads(stdout)
    parts = plan["memory_gib"]
    assert set(parts) == {"weights", "gradients and optimizer", "activations", "logits", "runtime", "total"}
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"), abs=0.03)
    assert plan["allowed_gib"] > 0 and "needs about" in err
    assert not run_dir.exists()
    status, stdout, _ = run(capsys, *quick(tiny_dir, text, run_dir, "--dry-run", "--batch-size", "64", "--json"))
    assert json.loads(stdout)["memory_gib"]["activations"] > parts["activations"]  # more sequences, more saved


def test_a_dry_run_reads_no_weights_and_plans_as_the_run_does(capsys, tiny_dir, text, tmp_path, monkeypatch):
    import anyshape.train.loop as loop

    plans = []
    estimate = loop.training_memory
    monkeypatch.setattr(
        loop, "training_memory", lambda *args, **kwargs: plans.append(estimate(*args, **kwargs)) or plans[-1]
    )
    status, _, err = run(capsys, *quick(tiny_dir, text, tmp_path / "run", "--steps", "1"))
    assert status == 0, err
    monkeypatch.setattr(loop, "load", lambda *args: pytest.fail("a dry run read the weights"))
    status, _, err = run(capsys, *quick(tiny_dir, text, tmp_path / "dry", "--steps", "1", "--dry-run"))
    assert status == 0, err
    assert replace(plans[1], runtime=0) == replace(plans[0], runtime=0)  # the same tensors, from the config alone
    assert plans[1].runtime > 0 and plans[0].runtime > 0  # and what the process holds, measured
