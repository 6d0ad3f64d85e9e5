"""Calibrated compensation: exact at the full Shape, closer to the parent than the plain slice,
the plain slice at a huge ridge, and still a standard checkpoint."""

from unittest.mock import patch

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import anyshape
from anyshape import DataError, Shape, export_hf
from anyshape.compress.compensate import compensate
from anyshape.export.extract import extract_model
from anyshape.model.nll import mean_nll
from tests.conftest import TINY, TINY_CONFIGS, build_tiny
from tests.unit.test_extract import INPUT_IDS, SHAPES

BIASED = "llama-o-and-mlp-bias"  # the Llama variant whose o_proj and down_proj have biases
NAMES = sorted(TINY_CONFIGS) + [BIASED]


def mixed_shape(config) -> Shape:
    """Fewer layers, channels, KV groups, query heads and neurons at once."""
    return Shape.from_dict(
        {
            "layers": [0, 2, 3],
            "hidden_size": 48,
            "num_key_value_heads": max(1, config.num_key_value_heads // 2),
            "num_attention_heads": max(1, config.num_key_value_heads // 2) * max(1, config.queries_per_group // 2),
            "intermediate_size": 48,
        },
        config,
    )


@pytest.fixture(scope="module")
def tiny_models(tiny_dir, tmp_path_factory):
    """Every tiny model of TINY_CONFIGS, and a Llama with o_proj and MLP biases."""
    models = {name: anyshape.load(tiny_dir(name)) for name in TINY_CONFIGS}
    biased = LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    folder = tmp_path_factory.mktemp(BIASED)
    with patch.dict(TINY_CONFIGS, {BIASED: biased}):
        build_tiny(BIASED).save_pretrained(folder)
    models[BIASED] = anyshape.load(folder)
    assert models[BIASED].config.o_bias and models[BIASED].config.mlp_bias
    return models


@pytest.fixture(scope="module")
def confident_models(tiny_models):
    """(model, text it wrote) per name: the tiny model with its final norm scaled up 8 times, so
    it predicts sharply, and 8 x 32 tokens sampled from it. On such text the parent has a clearly
    lower NLL than a random model, so a child that tracks the parent better scores better."""
    result = {}
    for name, model in tiny_models.items():
        confident = extract_model(model, model.full_shape)
        with torch.no_grad():
            confident.model.norm.weight.mul_(8.0)
            generator = torch.Generator().manual_seed(0)
            text = torch.randint(0, 256, (8, 1), generator=generator)
            for _ in range(31):
                probabilities = confident(text)[:, -1].softmax(-1)  # (8, V)
                text = torch.cat([text, torch.multinomial(probabilities, 1, generator=generator)], dim=1)
        result[name] = confident, text
    return result


def residual_errors(parent, child, shape: Shape, input_ids) -> list[float]:
    """Per kept layer j: mean squared difference between the child's residual stream after
    layer j and the parent's after layer shape.layers[j], on the kept channels."""
    streams: dict[tuple[str, int], torch.Tensor] = {}
    handles = [
        module.model.layers[index].register_forward_hook(
            lambda _module, _args, output, key=(role, index): streams.__setitem__(key, output)
        )
        for role, module, layers in (("parent", parent, shape.layers), ("child", child, range(len(shape.layers))))
        for index in layers
    ]
    try:
        with torch.no_grad():
            parent(input_ids)
            child(input_ids)
    finally:
        for handle in handles:
            handle.remove()
    kept = shape.hidden_size
    return [
        (streams["child", j] - streams["parent", i][..., :kept]).pow(2).mean().item()
        for j, i in enumerate(shape.layers)
    ]


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("case", sorted(SHAPES))
def test_extracted_model_is_the_elastic_forward(tiny_models, name, case):
    model = tiny_models[name]
    shape = Shape.from_dict(SHAPES[case](model.config), model.config)
    child = extract_model(model, shape)
    with torch.no_grad():
        torch.testing.assert_close(child(INPUT_IDS), model(INPUT_IDS, shape))
    assert child.config.tie_word_embeddings == (child.lm_head.weight is child.model.embed_tokens.weight)


@pytest.mark.parametrize("name", ["llama-mha-tied", "qwen2-gqa"])
def test_extracted_model_exports_the_same_checkpoint(tiny_models, tmp_path, name):
    model = tiny_models[name]
    shape = mixed_shape(model.config)
    child = extract_model(model, shape)
    export_hf(model, shape, tmp_path / "from_parent")
    export_hf(child, child.full_shape, tmp_path / "from_child")
    parent_weights = load_file(tmp_path / "from_parent" / "model.safetensors")
    child_weights = load_file(tmp_path / "from_child" / "model.safetensors")
    assert parent_weights.keys() == child_weights.keys()
    for key, tensor in parent_weights.items():
        assert torch.equal(tensor, child_weights[key]), key
    configs = [(tmp_path / folder / "config.json").read_text() for folder in ("from_parent", "from_child")]
    assert configs[0] == configs[1]


@pytest.mark.parametrize("name", NAMES)
def test_full_shape_compensation_changes_nothing(tiny_models, confident_models, name):
    model, text = tiny_models[name], confident_models[name][1]
    child = compensate(model, model.full_shape, text)
    with torch.no_grad():
        torch.testing.assert_close(child(INPUT_IDS), model(INPUT_IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_compensation_tracks_the_parent_better_than_the_plain_slice(confident_models, name):
    parent, text = confident_models[name]
    shape = mixed_shape(parent.config)
    plain, compensated = extract_model(parent, shape), compensate(parent, shape, text)
    plain_errors = residual_errors(parent, plain, shape, text)
    compensated_errors = residual_errors(parent, compensated, shape, text)
    assert all(c < 0.5 * p for c, p in zip(compensated_errors, plain_errors, strict=True)), (
        compensated_errors,
        plain_errors,
    )
    assert mean_nll(compensated, text) < mean_nll(plain, text) - 0.05


@pytest.mark.parametrize("name", NAMES)
def test_huge_ridge_gives_the_plain_slice(confident_models, name):
    parent, text = confident_models[name]
    shape = mixed_shape(parent.config)
    child = compensate(parent, shape, text, ridge=1e12)
    plain = extract_model(parent, shape)
    with torch.no_grad():
        torch.testing.assert_close(child(INPUT_IDS), plain(INPUT_IDS), atol=1e-5, rtol=0)
    moderate = compensate(parent, shape, text)
    assert not torch.allclose(moderate.model.layers[0].mlp.down_proj.weight, plain.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("name", NAMES)
def test_compensated_child_exports_as_a_standard_checkpoint(confident_models, tmp_path, name):
    parent, text = confident_models[name]
    shape = mixed_shape(parent.config)
    child = compensate(parent, shape, text)
    export_hf(child, child.full_shape, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, child(INPUT_IDS), atol=1e-4, rtol=0)
    assert sum(p.numel() for p in reloaded.parameters()) == shape.num_parameters(parent.config)


def test_parent_is_untouched(tiny_models, confident_models):
    model, text = tiny_models["qwen2-gqa"], confident_models["qwen2-gqa"][1]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    compensate(model, mixed_shape(model.config), text)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name


@pytest.mark.parametrize("ridge", [0.0, -1.0, float("nan"), float("inf")])
def test_ridge_must_be_positive(tiny_models, ridge):
    model = tiny_models["llama-mha-tied"]
    with pytest.raises(DataError, match="must be positive and finite"):
        compensate(model, model.full_shape, INPUT_IDS, ridge=ridge)
