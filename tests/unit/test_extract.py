"""Extraction is exact: an exported Shape reloads in `transformers` with the elastic logits."""

import json

import pytest
import torch
from hypothesis import given, settings
from transformers import AutoModelForCausalLM

import anyshape
from anyshape import AnyshapeError, Shape, export_hf
from anyshape.export.provenance import read_provenance
from tests.conftest import TINY_CONFIGS
from tests.unit.test_shape import valid_shapes

SHAPES = {  # config -> shape fields
    "depth only": lambda c: {"layers": [0, 2, 3]},
    "width only": lambda c: {"hidden_size": 40, "intermediate_size": 50},
    "kv groups only": lambda c: {"num_key_value_heads": 1, "num_attention_heads": c.queries_per_group},
    "query heads only": lambda c: {"num_attention_heads": c.num_key_value_heads},  # one per group
    "mixed": lambda c: {
        "layers": [1, 3],
        "hidden_size": 48,
        "num_key_value_heads": 1,
        "num_attention_heads": max(1, c.queries_per_group // 2),
        "intermediate_size": 33,
    },
}
INPUT_IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))


def assert_export_is_exact(model, shape: Shape, out) -> AutoModelForCausalLM:
    export_hf(model, shape, out, parent="tiny")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, model(INPUT_IDS, shape), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in reloaded.parameters()) == shape.num_parameters(model.config)
    return reloaded


@pytest.fixture(scope="module")
def tiny_models(tiny_dir):
    return {name: anyshape.load(tiny_dir(name)) for name in TINY_CONFIGS}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_exported_shape_matches_the_elastic_model(tiny_models, tmp_path, name, case):
    model = tiny_models[name]
    shape = Shape.from_dict(SHAPES[case](model.config), model.config)
    reloaded = assert_export_is_exact(model, shape, tmp_path / "out")
    assert reloaded.config.num_hidden_layers == len(shape.layers)
    assert reloaded.config.head_dim == model.config.head_dim


@settings(max_examples=10, deadline=None)
@given(shape=valid_shapes(anyshape.model.config.LlamaFamilyConfig.from_hf(TINY_CONFIGS["qwen2-gqa"])))
def test_any_valid_shape_exports_exactly(tiny_models, tmp_path_factory, shape):
    assert_export_is_exact(tiny_models["qwen2-gqa"], shape, tmp_path_factory.mktemp("any") / "out")


def test_llama_shape_that_transformers_llama_refuses_is_written_as_mistral(tiny_models, tmp_path):
    """hidden_size 40 with 4 heads of head_dim 16: LlamaConfig refuses it, MistralConfig computes it."""
    model = tiny_models["llama-mha-tied"]
    shape = Shape.from_dict({"hidden_size": 42, "num_attention_heads": 4}, model.config)
    reloaded = assert_export_is_exact(model, shape, tmp_path / "out")
    assert reloaded.config.model_type == "mistral" and reloaded.config.sliding_window is None
    assert read_provenance(tmp_path / "out")["model_type"] == "mistral"


def test_provenance_and_files(tiny_models, tiny_dir, tmp_path):
    model = tiny_models["llama3-gqa"]
    shape = Shape.from_dict(SHAPES["mixed"](model.config), model.config)
    export_hf(model, shape, tmp_path / "out", tokenizer=anyshape.load_tokenizer(tiny_dir("llama3-gqa")), parent="p")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "anyshape.json",
    } <= files
    record = json.loads((tmp_path / "out" / "anyshape.json").read_text())
    assert record["parent"] == "p" and record["shape"] == shape.to_dict()
    assert record["num_parameters"] == shape.num_parameters(model.config)
    assert record["anyshape_version"] == anyshape.__version__
    assert {p.name for p in tmp_path.iterdir()} == {"out"}  # no partial folder left beside it


def test_interrupted_export_leaves_nothing_and_keeps_the_old_folder(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["llama-mha-tied"]
    out = tmp_path / "out"
    export_hf(model, model.full_shape, out)
    before = (out / "model.safetensors").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("anyshape.export.hf.write_provenance", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_hf(model, Shape.from_dict({"num_hidden_layers": 1}, model.config), out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    with pytest.raises(KeyboardInterrupt):
        export_hf(model, model.full_shape, tmp_path / "new")
    assert {p.name for p in tmp_path.iterdir()} == {"out"}


def test_existing_output_needs_overwrite(tiny_models, tmp_path):
    model = tiny_models["llama-mha-tied"]
    export_hf(model, model.full_shape, tmp_path / "out")
    with pytest.raises(AnyshapeError, match="already exists.*--overwrite"):
        export_hf(model, model.full_shape, tmp_path / "out")
    small = Shape.from_dict({"num_hidden_layers": 2}, model.config)
    assert_export_is_exact(model, small, tmp_path / "out2")
    export_hf(model, small, tmp_path / "out", overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 2
