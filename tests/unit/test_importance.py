"""Importance scores rank planted units last, and sorting by them is exact."""

import itertools

import pytest
import torch

import anyshape
from anyshape import DataError, Shape
from anyshape.importance.activations import AGGREGATIONS
from anyshape.importance.permute import Permutation, permute_, sort_
from anyshape.importance.scores import Scores, score
from anyshape.importance.units import layer_index
from anyshape.model.slicing import axes_of
from tests.conftest import TINY_CONFIGS

CALIBRATION = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
PROBE = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))


def fresh(tiny_dir, name="llama3-gqa"):
    return anyshape.load(tiny_dir(name))


@torch.no_grad()
def zero_unit(model, kind: str, layer: int | None, index: int) -> None:
    """Zeroes every weight that unit `index` of `kind` owns ('ffn', 'hidden', or 'kv')."""
    c = model.config
    width = {"ffn": 1, "hidden": 1, "kv": c.head_dim}[kind]
    for name, parameter in model.named_parameters():
        for dim, axis in enumerate(axes_of(name)):
            same_layer = kind == "hidden" or layer_index(name) == layer
            if same_layer and axis == kind:
                parameter.narrow(dim, index * width, width).zero_()
            if same_layer and kind == "kv" and axis == "query":  # a group owns its query heads
                span = c.queries_per_group * c.head_dim
                parameter.narrow(dim, index * span, span).zero_()


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("metric", ["activation", "magnitude", "taylor"])
def test_sorting_is_exact_and_puts_the_best_first(tiny_dir, name, metric):
    model = fresh(tiny_dir, name)
    with torch.no_grad():
        before = model(PROBE)
    sort_(model, score(model, CALIBRATION, metric=metric))
    with torch.no_grad():
        torch.testing.assert_close(model(PROBE), before, atol=1e-5, rtol=0)
    rescored = score(model, CALIBRATION, metric=metric)
    for unit in ("neurons", "kv_groups", "heads", "channels"):
        values = getattr(rescored, unit)
        assert (values[..., :-1] >= values[..., 1:] - 1e-4 * values.abs().max()).all(), unit


def test_random_permutation_is_exact(tiny_dir):
    model = fresh(tiny_dir, "qwen2-gqa")
    c = model.config
    g = torch.Generator().manual_seed(5)
    permutation = Permutation(
        channels=torch.randperm(c.hidden_size, generator=g),
        neurons=torch.stack([torch.randperm(c.intermediate_size, generator=g) for _ in range(c.num_hidden_layers)]),
        kv_groups=torch.stack([torch.randperm(c.num_key_value_heads, generator=g) for _ in range(c.num_hidden_layers)]),
        heads=torch.stack(
            [
                torch.stack([torch.randperm(c.queries_per_group, generator=g) for _ in range(c.num_key_value_heads)])
                for _ in range(c.num_hidden_layers)
            ]
        ),
    )
    with torch.no_grad():
        before = model(PROBE)
        torch.testing.assert_close(permute_(model, permutation)(PROBE), before, atol=1e-5, rtol=0)


def test_sorted_prefix_equals_keeping_the_top_neurons(tiny_dir):
    """A sorted prefix of k neurons computes what the unsorted model computes with only its
    k best neurons (the others' down_proj columns zeroed)."""
    model = fresh(tiny_dir)
    scores = score(model, CALIBRATION)
    k = 30
    reference = fresh(tiny_dir)
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            dropped = torch.argsort(scores.neurons[i], descending=True, stable=True)[k:]
            layer.mlp.down_proj.weight[:, dropped] = 0
        expected = reference(PROBE)
    sort_(model, scores)
    with torch.no_grad():
        actual = model(PROBE, Shape.from_dict({"intermediate_size": k}, model.config))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("metric", "agg_batch", "agg_seq"),
    [
        *(("activation", b, s) for b, s in itertools.product(AGGREGATIONS, AGGREGATIONS)),
        ("magnitude", "mean", "mean"),
        ("taylor", "mean", "mean"),
    ],
)
def test_planted_dead_units_score_lowest(tiny_dir, metric, agg_batch, agg_seq):
    model = fresh(tiny_dir)
    zero_unit(model, "ffn", layer=1, index=7)
    zero_unit(model, "hidden", layer=None, index=11)
    zero_unit(model, "kv", layer=2, index=1)
    scores = score(model, CALIBRATION, metric=metric, agg_batch=agg_batch, agg_seq=agg_seq)
    assert scores.neurons[1].argmin() == 7
    assert scores.channels.argmin() == 11
    assert scores.kv_groups[2].argmin() == 1
    assert scores.neurons[1, 7] < scores.neurons[1].sort().values[1]  # strictly lowest


def test_scores_are_deterministic_and_reload(tiny_dir, tmp_path):
    model = fresh(tiny_dir)
    first, second = score(model, CALIBRATION), score(model, CALIBRATION)
    for unit, tensor in first.tensors().items():
        assert torch.equal(tensor, getattr(second, unit)), unit
    first.save(tmp_path / "s.safetensors")
    loaded = Scores.load(tmp_path / "s.safetensors", model.config)
    assert loaded.info == first.info and torch.equal(loaded.neurons, first.neurons)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_scores_of_another_model_are_refused(tiny_dir, tmp_path):
    score(fresh(tiny_dir, "qwen2-gqa"), CALIBRATION).save(tmp_path / "s.safetensors")
    with pytest.raises(DataError, match=r"heads scores are \(4, 3, 2\), the model needs \(4, 2, 4\)"):
        Scores.load(tmp_path / "s.safetensors", fresh(tiny_dir).config)


@pytest.mark.parametrize(("option", "value"), [("metric", "l1"), ("layer_metric", "x"), ("agg_seq", "max")])
def test_unknown_options_are_refused(tiny_dir, option, value):
    with pytest.raises(DataError, match=f"unknown .*{value!r}; choose one of"):
        score(fresh(tiny_dir), CALIBRATION, **{option: value})


def test_block_drop_ranks_a_removed_layer_as_useless(tiny_dir):
    """A layer whose o_proj and down_proj are zero is the identity: skipping it costs nothing."""
    model = fresh(tiny_dir)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    for layer_metric in ("bi", "drop"):
        layers = score(model, CALIBRATION, layer_metric=layer_metric).layers
        assert layers.argmin() == 2 and abs(layers[2]) < 1e-5, layer_metric


def test_sort_returns_the_scores_of_the_sorted_model(tiny_dir):
    model = fresh(tiny_dir, "qwen2-gqa")
    sorted_scores = sort_(model, score(model, CALIBRATION, metric="magnitude"))
    rescored = score(model, CALIBRATION, metric="magnitude")
    for unit, tensor in rescored.tensors().items():
        torch.testing.assert_close(getattr(sorted_scores, unit), tensor, rtol=1e-5, atol=1e-6)
