"""The `anyshape` command on the embedded SmolLM2-135M (slow: each test loads the real model)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from anyshape import Shape, load_config
from anyshape.cli import main

pytestmark = pytest.mark.slow

NEW_TOKENS = 8


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return status, out, err


def test_extract_then_generate(capsys, tmp_path):
    out = tmp_path / "small"
    shape = '{"num_hidden_layers": 6}'
    status, stdout, err = run(capsys, "extract", "smollm2-135m", "--shape", shape, "--out", out, "--json")
    assert status == 0, err
    config = load_config("smollm2-135m")
    expected = Shape.parse(shape, config).num_parameters(config)
    assert json.loads(stdout)["num_parameters"] == expected

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    assert sum(p.numel() for p in model.parameters()) == expected

    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert generated.shape == (1, inputs.input_ids.shape[1] + NEW_TOKENS)
    assert torch.equal(generated[0, : inputs.input_ids.shape[1]], inputs.input_ids[0])


def test_info_json(capsys):
    status, stdout, err = run(capsys, "info", "smollm2-135m", "--json")
    assert status == 0, err
    record = json.loads(stdout)
    assert record["num_parameters"] == 134_515_008
    assert record["num_parameters_non_embedding"] == 106_203_456
    assert record["num_hidden_layers"] == 30
    assert record["model_type"] == "llama"
