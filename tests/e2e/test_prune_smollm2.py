"""`anyshape prune` on the embedded SmolLM2-135M, then continued training (slow: it loads the real model)."""

import json

import pytest
from transformers import AutoModelForCausalLM

from anyshape.cli import main

pytestmark = pytest.mark.slow

TARGET = {"num_hidden_layers": 20, "hidden_size": 448, "num_attention_heads": 6, "num_key_value_heads": 2,
          "intermediate_size": 1024}  # fmt: skip


def test_prune_to_exact_sizes_then_continue(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(400)))
    out = tmp_path / "sheared"
    status = main(["prune", "smollm2-135m", "--target", json.dumps(TARGET), "--data", str(text), "--prune-steps", "2",
                   "--seq-len", "32", "--batch-size", "2", "--out", str(out), "--json"])  # fmt: skip
    stdout, err = capsys.readouterr()
    assert status == 0, err
    assert json.loads(stdout)["config"] == TARGET
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert {name: getattr(reloaded.config, name) for name in TARGET} == TARGET
    assert main(["train", str(out / "model"), "--continue", "--data", str(text), "--steps", "1", "--seq-len", "32",
                 "--batch-size", "2", "--out", str(tmp_path / "continued")]) == 0  # fmt: skip
