"""Shape validation, arithmetic and JSON."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from anyshape import Shape, ShapeError
from anyshape.model.config import LlamaFamilyConfig
from tests.conftest import TINY_CONFIGS

CONFIG = LlamaFamilyConfig.from_hf(TINY_CONFIGS["llama3-gqa"])  # 4 layers, H 64, 8 heads / 2 KV, F 96


def shape(**changes) -> Shape:
    return Shape.from_dict(changes, CONFIG)


def test_missing_fields_default_to_the_parent():
    assert shape() == Shape.full(CONFIG)
    assert shape(num_hidden_layers=2).layers == (0, 1)
    assert shape(hidden_size=32).intermediate_size == CONFIG.intermediate_size


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layers": []}, "layers is empty"),
        ({"layers": [0, 4]}, r"index 4 is out of range.*0\.\.3"),
        ({"layers": [-1]}, "index -1 is out of range"),
        ({"layers": [2, 1]}, "strictly increasing"),
        ({"layers": [1, 1]}, "strictly increasing"),
        ({"layers": "0,1"}, "layers must be a list"),
        ({"layers": [0, 1], "num_hidden_layers": 3}, "disagrees"),
        ({"num_hidden_layers": 0}, r"num_hidden_layers=0 is out of range"),
        ({"num_hidden_layers": True}, r"num_hidden_layers=True is out of range"),
        ({"hidden_size": 65}, r"hidden_size=65 is out of range.*1\.\.64"),
        ({"hidden_size": 0}, "hidden_size=0"),
        ({"hidden_size": 32.0}, "must be an integer"),
        ({"intermediate_size": 97}, "intermediate_size=97"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
        ({"num_attention_heads": 9}, "num_attention_heads=9"),
        ({"num_attention_heads": 5, "num_key_value_heads": 2}, "not a multiple of num_key_value_heads=2"),
        ({"num_attention_heads": 6, "num_key_value_heads": 1}, "6 query heads in each KV group.*4 per group"),
        ({"hidden": 32}, "unknown shape field 'hidden'"),
    ],
)
def test_invalid_shapes_name_the_field_and_the_limit(changes, message):
    with pytest.raises(ShapeError, match=message):
        shape(**changes)


def test_binary_shape_file_is_refused(tmp_path):
    (tmp_path / "shape.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ShapeError, match="not UTF-8"):
        Shape.parse(tmp_path / "shape.json", CONFIG)


def test_parse_inline_json_and_file(tmp_path):
    inline = '{"layers": [0, 2], "hidden_size": 48, "num_attention_heads": 4, "num_key_value_heads": 1}'
    path = tmp_path / "shape.json"
    path.write_text(inline)
    assert Shape.parse(inline, CONFIG) == Shape.parse(path, CONFIG) == Shape((0, 2), 48, 4, 1, 96)
    assert Shape.parse(Shape.parse(inline, CONFIG).to_json(), CONFIG) == Shape((0, 2), 48, 4, 1, 96)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{'hidden_size': 3}", "not valid JSON"),
        ("no-such-file.json", "neither inline JSON"),
        ("[1]", "must be a JSON object"),
    ],
)
def test_parse_errors(text, message):
    with pytest.raises(ShapeError, match=message):
        Shape.parse(text, CONFIG)


def valid_shapes(config: LlamaFamilyConfig):
    """Hypothesis strategy for every valid Shape of `config`."""
    return st.builds(
        lambda layers, hidden, groups, per_group, ffn: Shape(
            tuple(sorted(layers)), hidden, groups * per_group, groups, ffn
        ),
        st.sets(st.integers(0, config.num_hidden_layers - 1), min_size=1),
        st.integers(1, config.hidden_size),
        st.integers(1, config.num_key_value_heads),
        st.integers(1, config.queries_per_group),
        st.integers(1, config.intermediate_size),
    )


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_parameter_count_equals_the_transformers_model(name, data):
    """Counts the parameters of a `transformers` model built from the Shape's config."""
    config = LlamaFamilyConfig.from_hf(TINY_CONFIGS[name])
    candidate = data.draw(
        valid_shapes(config).filter(
            lambda s: config.model_type != "llama" or s.hidden_size % s.num_attention_heads == 0
        )
    )
    widths = {key: value for key, value in candidate.to_dict().items() if key != "layers"}
    parent = TINY_CONFIGS[name]
    depth = {"num_hidden_layers": len(candidate.layers), "layer_types": None}
    hf = type(parent).from_dict({**parent.to_dict(), **widths, **depth})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    assert candidate.num_parameters(config) == sum(p.numel() for p in model.parameters())
    embedding = config.vocab_size * candidate.hidden_size * (1 if config.tie_word_embeddings else 2)
    assert candidate.num_parameters(config, embeddings=False) == candidate.num_parameters(config) - embedding


def test_flops_grow_with_every_width_and_with_context():
    full = Shape.full(CONFIG)
    smaller = [
        shape(num_hidden_layers=3),
        shape(hidden_size=32),
        shape(num_attention_heads=4, num_key_value_heads=1),
        shape(intermediate_size=48),
    ]
    for small in smaller:
        assert small.flops_per_token(CONFIG) < full.flops_per_token(CONFIG)
    assert full.flops_per_token(CONFIG, context=1024) > full.flops_per_token(CONFIG, context=512)


def test_json_round_trip():
    s = shape(layers=[1, 3], hidden_size=40)
    assert json.loads(s.to_json())["layers"] == [1, 3]
    assert Shape.from_dict(json.loads(s.to_json()), CONFIG) == s
