"""The budget router and policy-aware modulation (LLaMaFlex) on tiny models."""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyshape
from anyshape import AnyshapeError, Shape
from anyshape.model.adapters import add_adapters, merged
from anyshape.model.load import load_config
from anyshape.model.masks import MaskedShape
from anyshape.model.modulation import add_modulation
from anyshape.router.control import RouterControl, load_router
from anyshape.router.router import BudgetRouter, straight_through
from anyshape.search.budget import Budget, parse_anchors
from anyshape.search.space import AXES, SearchSpace
from anyshape.shape import parameter_count
from anyshape.train.loop import train
from tests.unit.test_cli import run
from tests.unit.test_train import (  # noqa: F401 (fixtures)
    INPUT_IDS,
    PARENT,
    assert_same_state,
    settings,
    text,
    train_in_one_and_two_processes,
    train_interrupted_and_resumed,
)

BUDGETS = [0.25 + i * 0.0625 for i in range(13)]  # 0.25 .. 1 in sixteenths, most never trained


def _elastic_model(tiny_dir, name: str, seed: int = 0):
    """A tiny parent with SMOL adapters and modulation whose parameters are all non-trivial."""
    model = anyshape.load(tiny_dir(name))
    add_adapters(model, "smol", rank=4, experts=3, top_k=2)
    add_modulation(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name or "modulation" in parameter_name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def _space(model, fractions=(0.25, 0.5, 0.75, 1.0)) -> SearchSpace:
    ranking = list(range(model.config.num_hidden_layers))[::-1]  # depth keeps the last layers first
    return SearchSpace.from_fractions(model.config, fractions, ranking, align=16)


def _sampled_shape(router: BudgetRouter, masked) -> Shape:
    """The Shape whose masks `masked` holds, read back from the masks."""
    config = router.space.config
    features = masked.features.detach().tolist()
    sizes = {axis: round(f * router.parent_sizes[axis]) for axis, f in zip(AXES, features, strict=True)}
    groups, per_group = sizes["num_key_value_heads"], sizes["queries_per_group"]
    layers = tuple(i for i in range(config.num_hidden_layers) if masked.layer_mask[i] > 0.5)
    assert len(layers) == sizes["num_hidden_layers"]
    return Shape(layers, sizes["hidden_size"], groups * per_group, groups, sizes["intermediate_size"])


@pytest.mark.parametrize("name", ["llama3-gqa", "qwen2-gqa", "mistral-window"])
def test_hard_masks_compute_what_the_sliced_shape_computes(tiny_dir, name):
    model = _elastic_model(tiny_dir, name)
    torch.manual_seed(0)
    router = BudgetRouter(_space(model), (0.25, 1.0))
    generator = torch.Generator().manual_seed(0)
    seen = set()
    with torch.no_grad():
        for budget in [0.3, 0.5, 0.7, 0.9] * 2:
            masked = router.sample(router.logits(budget), 5.0, generator)  # hot: the bumps spread
            shape = _sampled_shape(router, masked)
            seen.add(shape)
            torch.testing.assert_close(model(INPUT_IDS, masked), model(INPUT_IDS, shape), atol=2e-5, rtol=1e-5)
    assert len(seen) >= 4, "the samples should cover several Shapes"


def test_masks_pass_gradients_to_every_choice(tiny_dir):
    model = _elastic_model(tiny_dir, PARENT)
    torch.manual_seed(0)
    router = BudgetRouter(_space(model), (0.25, 1.0))
    logits = router.logits(0.5)
    model(INPUT_IDS, router.sample(logits, 1.0, torch.Generator().manual_seed(0))).logsumexp(-1).mean().backward()
    gradient = router.net[2].weight.grad  # (axes, width): each axis's centre
    assert all(row.abs().sum() > 0 for row in gradient), "some axis gets no gradient through its masks"


def test_modulation_folds_into_the_weights_exactly(tiny_dir, tmp_path):
    model = _elastic_model(tiny_dir, PARENT)
    shapes = [
        Shape.full(model.config),
        Shape((0, 2), 32, 4, 2, 48),
        Shape((1, 2, 3), 48, 2, 1, 96),
        Shape((3,), 16, 8, 2, 16),
    ]
    with torch.no_grad():
        for shape in shapes:
            plain = merged(model, shape)
            assert not any("modulation" in name or "lora" in name for name in plain.state_dict())
            torch.testing.assert_close(plain(INPUT_IDS, shape), model(INPUT_IDS, shape), atol=1e-5, rtol=1e-5)
        assert (model(INPUT_IDS, shapes[1]) - anyshape.load(tiny_dir(PARENT))(INPUT_IDS, shapes[1])).abs().max() > 1e-3
        anyshape.export_hf(model, shapes[1], tmp_path / "small")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, model(INPUT_IDS, shapes[1]), atol=1e-5, rtol=1e-5)


def test_expected_parameters_are_the_expectation_over_the_grid(tiny_dir):
    model = anyshape.load(tiny_dir(PARENT))
    space = _space(model, (0.5, 1.0))
    for basis in ("total", "non-embedding"):
        torch.manual_seed(1)
        router = BudgetRouter(space, (0.5, 1.0), basis)
        logits = router.logits(0.7)
        probabilities = {axis: logits[axis].softmax(-1) for axis in AXES}
        expected = 0.0
        for indices in itertools.product(*(range(len(space.options[a])) for a in AXES)):
            p = math.prod(probabilities[a][i].item() for a, i in zip(AXES, indices, strict=True))
            shape = space.shape({a: space.options[a][i] for a, i in zip(AXES, indices, strict=True)})
            expected += p * shape.num_parameters(model.config, embeddings=basis == "total")
        assert router.expected_fraction(logits).item() == pytest.approx(expected / router.parent_parameters, rel=1e-5)
        fraction = router.expected_fraction(logits).item()
        assert router.budget_loss(fraction * 1.01, logits).item() == 0.0
        assert router.budget_loss(fraction / 2, logits).item() == pytest.approx(1.0, rel=1e-4)


def test_straight_through_sample_is_one_hot_with_the_relaxed_gradient():
    logits = torch.tensor([0.3, -1.0, 2.0, 0.5], requires_grad=True)
    counts = torch.zeros(4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2000):
        sample = straight_through(logits, 0.5, generator)
        assert sorted(sample.tolist()) == [0.0, 0.0, 0.0, 1.0]
        counts += sample.detach()
    torch.testing.assert_close(counts / 2000, (logits / 0.5).softmax(-1).detach(), atol=0.03, rtol=0)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (straight_through(logits, 0.5, torch.Generator().manual_seed(3)) @ weights).backward()
    assert logits.grad.abs().sum() > 0 and logits.grad.sum().abs() < 1e-5  # a softmax's gradient sums to 0


def test_budgets_parse_fractions_and_counts(tiny_dir):
    config = anyshape.load_config(tiny_dir(PARENT))
    total = Shape.full(config).num_parameters(config)
    assert Budget.parse("0.4", config) == Budget(0.4, "total")
    assert Budget.parse("0.1M", config).fraction == pytest.approx(1e5 / total)
    assert Budget.parse("20K", config, "non-embedding").basis == "non-embedding"
    for bad, words in [("1.5", "outside (0, 1]"), ("0", "outside (0, 1]"), ("-0.2", "not a number"),
                       ("lots", "not a number"), ("5M", "more than the parent")]:  # fmt: skip
        with pytest.raises(AnyshapeError, match=re.escape(words)):
            Budget.parse(bad, config)
    assert parse_anchors("1,0.25,0.5") == (0.25, 0.5, 1.0)
    with pytest.raises(AnyshapeError, match="at least two"):
        parse_anchors("0.5")


@pytest.fixture
def router_settings(settings):  # noqa: F811
    return replace(
        settings, router=True, router_only=True, fractions=(0.25, 0.5, 0.75, 1.0), steps=200,
        warmup_steps=20, save_every=200, eval_every=200, val_batches=1,
    )  # fmt: skip


@pytest.mark.integration
def test_a_trained_router_meets_its_anchors_and_grows_with_the_budget(router_settings):
    train(router_settings, controller=RouterControl)
    router = load_router(Path(router_settings.out))
    config = router.space.config
    for anchor in router_settings.anchors:
        route = router.route(Budget(anchor))
        assert route.meets_budget, f"the router's own choice at anchor {anchor} is over budget"
        assert route.num_parameters <= route.budget_parameters
    assert router.route(Budget(1.0)).shape == Shape.full(config)
    counts = [router.route(Budget(b)).num_parameters for b in BUDGETS]
    assert counts == sorted(counts), f"parameters not monotone in the budget: {counts}"
    assert counts[-1] > 2 * counts[0]
    _assert_centres_between_anchors(router, tolerance=0.003)


def _assert_centres_between_anchors(router: BudgetRouter, tolerance: float) -> None:
    """Every axis's centre at budgets between two anchors lies between the anchors' centres."""
    anchors = router.anchors.tolist()
    with torch.no_grad():
        for low, high in itertools.pairwise(anchors):
            ends = torch.stack([router.centres(low), router.centres(high)])
            for t in torch.linspace(0.05, 0.95, 19).tolist():
                budget = low + t * (high - low)
                centres = router.centres(budget)
                outside = torch.maximum(ends.min(0).values - centres, centres - ends.max(0).values).max().item()
                assert outside <= tolerance, f"at {budget:.3f} a centre is {outside:.3f} outside its anchors'"


def test_settling_puts_interpolated_centres_between_the_anchors_and_keeps_the_anchors(tiny_dir):
    model = anyshape.load(tiny_dir("llama3-gqa"))
    torch.manual_seed(0)
    router = BudgetRouter(_space(model), (0.25, 0.5, 0.75, 1.0))
    with torch.no_grad():  # a far-off interpolation: the anchors' embeddings nearly cancel pairwise
        router.anchor_embeddings.copy_(torch.randn(1, 64) * torch.tensor([[3.0], [-3.0], [3.0], [-3.0]]))
        anchors = router.anchors.tolist()
        trained = torch.stack([router.centres(anchor) for anchor in anchors])
    assert max(router.betweenness_loss(t).item() for t in (0.25, 0.5, 0.75)) > 0.01
    router.settle_between_anchors()
    assert all(p.grad is None for p in router.parameters())
    _assert_centres_between_anchors(router, tolerance=0.003)
    with torch.no_grad():
        settled = torch.stack([router.centres(anchor) for anchor in anchors])
    torch.testing.assert_close(settled, trained, atol=1e-3, rtol=0)


@pytest.mark.integration
def test_router_and_modulation_resume_exactly(router_settings):
    run_settings = replace(router_settings, router_only=False, modulation=True, steps=6, save_every=3, eval_every=3)
    reference = train_interrupted_and_resumed(run_settings, 4, RouterControl)
    _assert_same_run(Path(run_settings.out), Path(reference.out))


def _assert_same_run(a: Path, b: Path) -> None:
    assert_same_state(anyshape.load(a), anyshape.load(b), atol=1e-5, rtol=1e-4)
    assert_same_state(load_router(a), load_router(b), atol=1e-5, rtol=1e-4)


@pytest.mark.integration
def test_two_processes_train_the_same_router_as_one(router_settings):
    run_settings = replace(
        router_settings, router_only=False, steps=3, grad_accum=2, save_every=3, eval_every=3, router_lr=0.003
    )
    single = train_in_one_and_two_processes(run_settings, RouterControl)
    assert_same_state(anyshape.load(run_settings.out), anyshape.load(single.out), atol=1e-5, rtol=1e-4)
    # The same choice distributions at and between the anchors. Not the same weights: an option
    # of almost no probability has a gradient at the level of rounding, whose sign Adam turns
    # into a step of the full learning rate, so summing in another order moves those weights.
    two, one = load_router(Path(run_settings.out)), load_router(Path(single.out))
    for budget in (0.25, 0.375, 0.5, 0.625, 0.75, 1.0):
        for axis, logits in two.logits(budget).items():
            torch.testing.assert_close(logits.softmax(-1), one.logits(budget)[axis].softmax(-1), atol=1e-4, rtol=0)


def test_route_and_extract_by_budget(capsys, router_settings, tmp_path):
    run_settings = replace(router_settings, router_only=False, modulation=True, steps=3, save_every=3, eval_every=3)
    train(run_settings, controller=RouterControl)
    status, stdout, err = run(capsys, "route", run_settings.out, "--budget", "0.6", "--json")
    assert status == 0, err
    record = json.loads(stdout)
    assert record["num_parameters"] <= record["budget_parameters"] and record["budget_basis"] == "total"
    assert set(record) >= {"shape", "num_parameters_non_embedding", "meets_budget"}

    status, _, err = run(capsys, "extract", run_settings.out, "--budget", "0.6", "--out", tmp_path / "m60")
    assert status == 0, err
    model = anyshape.load(run_settings.out)
    shape = Shape.from_dict(record["shape"], model.config)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m60")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, model(INPUT_IDS, shape), atol=1e-5, rtol=1e-5)
    provenance = json.loads((tmp_path / "m60" / "anyshape.json").read_text())
    assert provenance["route"]["budget"] == 0.6


@pytest.mark.parametrize(
    ("arguments", "words"),
    [
        (["--budget", "1.5"], "outside (0, 1]"),
        (["--budget", "0"], "outside (0, 1]"),
        (["--budget", "many"], "not a number"),
    ],
)
def test_route_refuses_a_bad_budget(capsys, router_settings, arguments, words):
    train(replace(router_settings, steps=1), controller=RouterControl)
    status, _, err = run(capsys, "route", router_settings.out, *arguments)
    assert status == 2 and words in err and "Traceback" not in err


def test_route_refuses_a_run_without_a_router_and_bad_router_settings(capsys, settings):  # noqa: F811
    train(replace(settings, steps=1))
    status, _, err = run(capsys, "route", settings.out, "--budget", "0.5")
    assert status == 2 and "without a router" in err
    with pytest.raises(AnyshapeError, match="pass --router"):
        train(replace(settings, router_only=True, out=settings.out + "-2"))
    with pytest.raises(AnyshapeError, match="anchor 1.2 is outside"):
        train(replace(settings, router=True, anchors=(0.5, 1.2), out=settings.out + "-3"))


def test_per_layer_masks_select_each_layers_own_units(tiny_dir):
    model = anyshape.load(tiny_dir(PARENT))
    config = model.config
    full = Shape.full(config)
    generator = torch.Generator().manual_seed(0)
    heads = (torch.rand(config.num_hidden_layers, config.num_attention_heads, generator=generator) > 0.4).float()
    neurons = (torch.rand(config.num_hidden_layers, config.intermediate_size, generator=generator) > 0.5).float()
    features = torch.ones(5)
    masked = MaskedShape.of(
        config, layer_mask=torch.ones(4), hidden_mask=torch.ones(64), head_mask=heads, neuron_mask=neurons,
        features=features,
    )  # fmt: skip
    with torch.no_grad():  # the same mask as zeroed weights: o_proj's head columns, down_proj's neuron columns
        pruned = anyshape.load(tiny_dir(PARENT))
        for i, layer in enumerate(pruned.model.layers):
            layer.self_attn.o_proj.weight *= heads[i].repeat_interleave(config.head_dim)
            layer.mlp.down_proj.weight *= neurons[i]
        torch.testing.assert_close(model(INPUT_IDS, masked), pruned(INPUT_IDS, full), atol=1e-5, rtol=1e-5)


def test_each_anchor_starts_at_its_budget():
    config = load_config("smollm2-135m")  # SmolLM2's sizes (the GGUF header only)
    space = SearchSpace.from_fractions(config, tuple(i / 16 for i in range(2, 17)), align=32)
    torch.manual_seed(0)
    router = BudgetRouter(space, (0.25, 0.5, 0.75, 1.0))
    for anchor in (0.25, 0.5, 0.75):
        scale = router._uniform_scale(anchor)
        sizes = [scale * router.parent_sizes[axis] for axis in AXES]
        assert parameter_count(config, *sizes) / router.parent_parameters == pytest.approx(anchor, rel=1e-6)
    router.start_at_budgets()
    assert all(p.grad is None for p in router.parameters()), "the fit's gradients would leak into training"
    _assert_centres_between_anchors(router, tolerance=0.003)
    with torch.no_grad():
        for anchor in (0.25, 0.5, 0.75):
            assert router.expected_fraction(router.logits(anchor)).item() / anchor == pytest.approx(1, abs=0.05)
        assert router.route(Budget(1.0)).shape == Shape.full(config)
