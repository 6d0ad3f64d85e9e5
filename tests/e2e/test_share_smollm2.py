"""`anyshape share` on the embedded SmolLM2-135M (slow: it loads the real model)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyshape
from anyshape.cli import main

pytestmark = pytest.mark.slow


def test_share_then_info_and_merged_extract(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "train.txt"
    text.write_text(" ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(400)))
    out = tmp_path / "shared"
    status = main(["share", "smollm2-135m", "--replace", "next-interval", "--start-layer", "24", "--rank", "8",
                   "--data", str(text), "--warmup-steps", "3", "--warmup-sequences", "4", "--finetune-steps", "1",
                   "--seq-len", "32", "--batch-size", "2", "--out", str(out), "--json"])  # fmt: skip
    stdout, err = capsys.readouterr()
    assert status == 0, err
    record = json.loads(stdout)
    assert record["replaced_layers"] == [25, 27, 29]
    assert record["warmup_error_after"] < record["warmup_error_direct"]
    mlp = 3 * 576 * 1536
    recovery = 3 * 3 * 8 * (576 + 1536)
    assert record["stored_parameters"] == 134_515_008 - 3 * mlp + recovery  # each shared MLP stored once
    assert 0 < record["stored_bytes"] - 4 * record["stored_parameters"] < 100_000  # float32 data + the header

    assert main(["extract", str(out), "--merge", "--out", str(tmp_path / "plain")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, anyshape.load(out)(ids), atol=1e-4, rtol=1e-4)
