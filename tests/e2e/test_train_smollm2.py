"""`anyshape train` on the embedded SmolLM2-135M under torchrun (slow: two processes load it)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyshape
from anyshape import Shape

pytestmark = pytest.mark.slow

SHAPE = '{"num_hidden_layers": 20, "hidden_size": 448, "intermediate_size": 1024}'


def test_torchrun_smol_adapters_then_extract(tmp_path):
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(600)))
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
        "-m", "anyshape", "train", "smollm2-135m", "--data", str(text), "--out", str(run_dir),
        "--adapter", "smol", "--lora-rank", "4", "--experts", "2", "--steps", "2", "--seq-len", "32",
        "--batch-size", "2", "--random-shapes", "1", "--json",
    ]  # fmt: skip
    environment = {**os.environ, "ANYSHAPE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["step"] == 2  # one report, from rank 0

    model = anyshape.load(run_dir)
    shape = Shape.parse(SHAPE, model.config)
    anyshape.export_hf(model, shape, tmp_path / "small")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids, shape), atol=1e-4, rtol=1e-4)
