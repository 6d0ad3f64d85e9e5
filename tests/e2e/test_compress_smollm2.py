"""`anyshape compress` on the embedded SmolLM2-135M with a tiny budget of tokens, trials and training."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from anyshape.data.text import default_text
from tests.unit.test_cli import run

pytestmark = pytest.mark.slow


def test_compress_exports_members_that_transformers_loads(capsys, tmp_path, hf_perplexity):
    out = tmp_path / "family"
    args = [
        "compress", "smollm2-135m", "--out", out, "--budgets", "0.5,0.75", "--trials", "3",
        "--num-sequences", "4", "--sequence-length", "128", "--search-sequences", "2", "--search-length", "64",
        "--eval-tokens", "512", "--train-tokens", "256", "--train-seq-len", "64", "--train-batch-size", "2", "--json",
    ]  # fmt: skip
    status, stdout, err = run(capsys, *args)
    assert status == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parent"]["num_parameters"] == 134_515_008
    for member in summary["members"]:
        reloaded = AutoModelForCausalLM.from_pretrained(out / member["folder"])
        assert sum(p.numel() for p in reloaded.parameters()) == member["num_parameters"]
        assert member["num_parameters"] <= member["budget"] * 134_515_008
        # the member's perplexity on the evaluation split (the text's first 512 tokens), as transformers gives it
        assert member["ppl"] == pytest.approx(
            hf_perplexity(out / member["folder"], default_text(), max_tokens=512), rel=1e-3
        )
    assert summary["training"]["steps"] == 2 and (out / "elastic" / "importance.safetensors").is_file()
    report = (out / "report.md").read_text()
    assert "## Budget 0.5" in report and "mlp-only" in report
    assert json.loads(stdout)["members"][0]["folder"] == str(out / "0.5")
