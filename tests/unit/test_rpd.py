"""Relative Perplexity Decrease over random Shapes."""

import pytest
import torch

import anyshape
from anyshape import DataError
from anyshape.importance.rpd import Scheme, random_shapes, relative_perplexity_decrease


def test_schemes_parse():
    assert Scheme.parse("activation:norm:variance") == Scheme("activation", "norm", "variance")
    assert str(Scheme.parse("magnitude")) == "magnitude"
    for bad in ("activation:max:mean", "magnitude:mean:mean", "l1"):
        with pytest.raises(DataError, match="scheme|aggregation"):
            Scheme.parse(bad)


def test_random_shapes_are_valid_and_seeded(tiny_dir):
    config = anyshape.load_config(tiny_dir("llama3-gqa"))
    shapes = random_shapes(config, 20, seed=3)
    assert shapes == random_shapes(config, 20, seed=3) != random_shapes(config, 20, seed=4)
    assert len({s.intermediate_size for s in shapes}) > 1


def test_rpd_is_positive_when_half_the_neurons_are_dead_and_the_model_is_restored(tiny_dir):
    """A tiny model trained on a periodic sequence, then every other MLP neuron zeroed: sorting
    by magnitude moves the dead neurons last, so narrow Shapes keep more live ones."""
    model = anyshape.load(tiny_dir("llama3-gqa"))
    ids = (torch.arange(4 * 32).view(4, 32) * 7 % 23).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 1.0
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 1::2] = 0
            layer.mlp.gate_proj.weight[1::2] = 0
            layer.mlp.up_proj.weight[1::2] = 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    [result] = relative_perplexity_decrease(model, ids, ids, [Scheme("magnitude")], samples=8)
    assert result.rpd > 0 and result.mean_perplexity_sorted < result.mean_perplexity_unsorted
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
