"""Search space, algorithms and Pareto fronts on a tiny model."""

import dataclasses
import json

import pytest
import torch

import anyshape
from anyshape import DataError, ShapeError
from anyshape.search.algorithms import SearchResult, search
from anyshape.search.objectives import LatencyTable, Quality, cost_functions
from anyshape.search.pareto import dominates, non_dominated, plot_front
from anyshape.search.space import SearchSpace, aligned_widths, parse_fractions
from tests.conftest import assert_png

CALIBRATION = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model(tiny_dir):
    return anyshape.load(tiny_dir("llama3-gqa"))  # 4 layers, hidden 64, 8 heads in 2 groups, MLP 96


@pytest.fixture(scope="module")
def space(model):
    return SearchSpace.from_fractions(model.config, (0.25, 0.5, 0.75, 1.0), layer_ranking=[2, 0, 3, 1], align=8)


def test_space_grid_and_layer_sets(model, space):
    assert space.options["hidden_size"] == (16, 32, 48, 64)
    assert space.options["num_key_value_heads"] == (1, 2)  # 0.5 rounds to 0 -> at least 1
    assert space.options["queries_per_group"] == (1, 2, 3, 4)
    assert space.layer_sets == {1: (2,), 2: (0, 2), 3: (0, 2, 3), 4: (0, 1, 2, 3)}
    shapes = list(space.shapes())
    assert len(shapes) == len(space) == len(set(shapes)) == 4 * 4 * 2 * 4 * 4
    for shape in shapes:
        shape.validate(model.config)
    params = [s.num_parameters(model.config) for s in shapes]
    assert space.smallest().num_parameters(model.config) == min(params)
    assert space.largest() == model.full_shape


def test_widths_are_aligned_except_the_parents_own(model):
    wide = dataclasses.replace(model.config, hidden_size=600, intermediate_size=1536)  # 600 = 18 x 32 + 24
    space = SearchSpace.from_fractions(wide, (0.25, 0.5, 0.875, 1.0), align=32)
    assert space.options["hidden_size"] == (160, 288, 512, 600)  # 150 -> 160, 300 -> 288, 525 -> 512
    assert space.options["intermediate_size"] == (384, 768, 1344, 1536)
    assert SearchSpace.from_fractions(model.config, (0.25, 0.5, 1.0), align=32).options["hidden_size"] == (32, 64)
    assert aligned_widths(600, 32)[:3] == [600, 576, 544] and aligned_widths(600, 32)[-1] == 32
    assert aligned_widths(20, 32) == list(range(20, 0, -1))  # narrower than a block: any width
    with pytest.raises(ShapeError, match="at least 1"):
        SearchSpace.from_fractions(model.config, align=0)


def test_bad_fractions_and_rankings(model):
    with pytest.raises(ShapeError, match=r"\(0, 1\]"):
        parse_fractions("0.5,1.5")
    with pytest.raises(ShapeError, match="comma-separated"):
        parse_fractions("half")
    with pytest.raises(ShapeError, match="each of the 4 layers once"):
        SearchSpace.from_fractions(model.config, layer_ranking=[0, 0, 1, 2])


def test_dominance():
    assert dominates((1, 1), (1, 2)) and not dominates((1, 2), (1, 2)) and not dominates((0, 3), (1, 2))
    assert non_dominated([(1, 5), (2, 4), (2, 6), (3, 1), (3, 1), (4, 4)]) == [0, 1, 3, 4]


@pytest.mark.parametrize("algorithm", ["random", "bins", "nsga2"])
def test_front_is_non_dominated_within_bounds_and_reloads(model, space, algorithm, tmp_path):
    costs = cost_functions(model)
    full = model.full_shape.num_parameters(model.config)
    bounds = {"params": (None, 0.8 * full), "flops": (0.1 * model.full_shape.flops_per_token(model.config), None)}
    result = search(space, Quality(model, CALIBRATION), costs, ("params",), algorithm, trials=12, seed=1, bounds=bounds)
    assert len(result.trials) == 12 and len({t.shape for t in result.trials}) == 12
    for trial in result.trials:
        assert trial.costs["params"] == trial.shape.num_parameters(model.config) <= 0.8 * full
        assert trial.costs["flops"] >= 0.1 * model.full_shape.flops_per_token(model.config)
    front = result.front()
    assert front
    for a in front:
        assert not any(dominates(b.objectives(("params",)), a.objectives(("params",))) for b in result.trials)
    off_front = [t for t in result.trials if t not in front]
    for trial in off_front:
        assert any(dominates(f.objectives(("params",)), trial.objectives(("params",))) for f in front)
    result.save(tmp_path / "pareto.json")
    reloaded = SearchResult.load(tmp_path / "pareto.json", model.config)
    assert reloaded.trials == result.trials and reloaded.front() == front
    data = json.loads((tmp_path / "pareto.json").read_text())
    assert data["objectives"] == ["params", "ppl"] and len(data["evaluated"]) == 12


@pytest.mark.parametrize("algorithm", ["random", "bins", "nsga2"])
def test_searches_are_deterministic_given_the_seed(model, space, algorithm):
    def run(seed):
        return search(space, Quality(model, CALIBRATION), cost_functions(model), ("params",), algorithm, 8, seed)

    first = [t.shape for t in run(3).trials]
    assert first == [t.shape for t in run(3).trials]
    assert first != [t.shape for t in run(4).trials]


def test_bins_cover_the_parameter_range(model, space):
    costs = cost_functions(model)
    result = search(space, Quality(model, CALIBRATION), costs, ("params",), "bins", trials=6, seed=0)
    params = sorted(t.costs["params"] for t in result.trials)
    low, high = costs["params"](space.smallest()), costs["params"](space.largest())
    edges = [low + (high - low) * i / 6 for i in range(7)]
    filled = {next(b for b in range(6) if p < edges[b + 1] or b == 5) for p in params}
    assert len(filled) >= 5  # one per bin, except where a bin holds no Shape of the grid


def test_kd_quality_is_zero_for_the_full_model_and_grows_when_smaller(model, space):
    quality = Quality(model, CALIBRATION, "kd")
    assert quality(model.full_shape) == pytest.approx(0.0, abs=1e-5)
    assert quality(space.smallest()) > 0.01


def test_latency_table_is_measured_once_and_reused(model, space, tmp_path):
    table = LatencyTable(tmp_path / "latency.json", "tiny", prompt_tokens=8, repeats=2)
    first = table.measure(model, space.smallest())
    assert first["prefill_ms"] > 0 and first["decode_ms"] > 0
    again = LatencyTable(tmp_path / "latency.json", "tiny", prompt_tokens=8, repeats=2)
    assert again.measure(model, space.smallest()) == first  # read from the file, not re-measured
    assert LatencyTable(tmp_path / "latency.json", "other", prompt_tokens=8).entries.keys() == table.entries.keys()
    costs = cost_functions(model, again)
    assert costs["latency"](space.smallest()) == first["decode_ms"]


def test_plot_writes_a_png(model, space, tmp_path):
    result = search(space, Quality(model, CALIBRATION), cost_functions(model), ("params", "flops"), "random", 5)
    rows = [t.to_dict("ppl") for t in result.trials]
    plot_front(rows, [t.to_dict("ppl") for t in result.front()], ["params", "flops"], "ppl", tmp_path / "p.png")
    assert_png(tmp_path / "p.png")


def test_bad_requests(model, space):
    quality, costs = Quality(model, CALIBRATION), cost_functions(model)
    with pytest.raises(DataError, match="unknown search algorithm"):
        search(space, quality, costs, algorithm="grid")
    with pytest.raises(DataError, match="unknown cost 'latency'"):
        search(space, quality, costs, ("latency",))
    with pytest.raises(DataError, match="unknown quality"):
        Quality(model, CALIBRATION, "bleu")
    impossible = {"params": (None, 1.0)}
    assert search(space, quality, costs, algorithm="random", trials=3, bounds=impossible).trials == []
