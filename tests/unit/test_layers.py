"""Depth selection: DP, BI ranking and iterative drop."""

import pytest
import torch

import anyshape
from anyshape import DataError
from anyshape.importance.layers import select_layers

CALIBRATION = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model(tiny_dir):
    return anyshape.load(tiny_dir("llama3-gqa"))


@pytest.mark.parametrize("method", ["dp", "bi", "drop"])
def test_every_depth_keeps_k_distinct_ordered_layers(model, method, tiny_dir, hf_perplexity):
    selection = select_layers(model, CALIBRATION, method)
    assert sorted(selection.layers) == [1, 2, 3, 4]
    for k, layers in selection.layers.items():
        assert len(layers) == k and list(layers) == sorted(set(layers)) and all(0 <= i < 4 for i in layers)
        # the calibration perplexity of the parent keeping those layers, as transformers computes it
        reference = hf_perplexity(tiny_dir("llama3-gqa"), CALIBRATION, layers=layers)
        assert selection.perplexity[k] == pytest.approx(reference, rel=1e-5), k


@pytest.mark.parametrize("seed", range(3))
def test_dp_is_at_least_as_good_as_bi_drop(tiny_dir, seed):
    from tests.conftest import build_tiny

    folder = tiny_dir("llama3-gqa").parent / f"seed{seed}"
    build_tiny("llama3-gqa", seed=seed + 10).save_pretrained(folder)
    model = anyshape.load(folder)
    dp, drop = select_layers(model, CALIBRATION, "dp"), select_layers(model, CALIBRATION, "drop")
    for k in dp.layers:
        assert dp.perplexity[k] <= drop.perplexity[k] * (1 + 1e-6), k


def test_dp_for_one_depth_agrees_with_all_depths_and_costs_less(model):
    every, one = select_layers(model, CALIBRATION, "dp"), select_layers(model, CALIBRATION, "dp", keep=3)
    assert one.layers == {3: every.layers[3]} and one.evaluations <= every.evaluations


def test_bi_uses_given_layer_scores(model):
    selection = select_layers(model, CALIBRATION, "bi", keep=2, layer_scores=torch.tensor([0.0, 5.0, 1.0, 4.0]))
    assert selection.layers == {2: (1, 3)}


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"keep": 0}, "keep=0 is out of range"), ({"keep": 5}, r"1\.\.4"), ({"method": "greedy"}, "unknown")],
)
def test_bad_requests(model, changes, message):
    with pytest.raises(DataError, match=message):
        select_layers(model, CALIBRATION, **{"method": "dp", **changes})
