"""Targeted structured pruning (Sheared LLaMA): hard-concrete masks, the Lagrangian, finalisation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import anyshape
from anyshape import AnyshapeError
from anyshape.model.nll import next_token_nll
from anyshape.prune.control import PruningControl
from anyshape.prune.finalize import final_masks, final_shape, finalize
from anyshape.prune.hard_concrete import HardConcrete
from anyshape.prune.lagrangian import LAMBDA_LR, MASK_LR, Lagrangian, lambda_optimizer, mask_optimizer
from anyshape.prune.masks import PruningMasks
from anyshape.prune.target import FIELDS, PruningTarget
from anyshape.search.space import SearchSpace
from anyshape.train.distill import distillation_loss
from anyshape.train.settings import TrainSettings

PARENT = "llama3-gqa"  # 4 layers, hidden 64, 8 query heads in 2 KV groups, MLP 96
INPUT_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
HALF = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 1,
        "intermediate_size": 48}  # fmt: skip


@pytest.fixture
def parent(tiny_dir):
    torch.set_num_threads(1)
    model = anyshape.load(tiny_dir(PARENT))
    return model.requires_grad_(False)


def _random_masks(config, seed: int = 0) -> PruningMasks:
    masks = PruningMasks(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in masks.parameters():
            parameter.copy_(2 * torch.randn(parameter.shape, generator=generator))
    return masks


# ---------------------------------------------------------------- hard-concrete


def test_hard_concrete_samples_reach_exact_zero_and_one_and_their_l0_is_the_keep_probability():
    gate = HardConcrete((5, 20000))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0])[:, None].expand(5, 20000))
    z = gate.sample(torch.Generator().manual_seed(0))
    assert z.min() == 0 and z.max() == 1
    assert ((z == 0).float().mean(-1) > 0.01).all() and ((z == 1).float().mean(-1) > 0.01).all()
    assert ((z > 0) & (z < 1)).any(-1).all(), "the sample is continuous between the two ends"
    p = gate.keep_probability()[:, 0]
    torch.testing.assert_close((z > 0).float().mean(-1), p.detach(), atol=0.012, rtol=0)
    assert (p.diff() > 0).all()
    z.sum().backward()
    assert (gate.log_alpha.grad.sum(-1) > 0).all(), "samples grow with log_alpha"
    deterministic = gate.deterministic()[:, 0]
    assert deterministic[0] == 0 and deterministic[-1] == 1 and (deterministic.diff() >= 0).all()


def test_hard_concrete_starts_at_init_keep():
    torch.testing.assert_close(HardConcrete((3,), init_keep=0.7).keep_probability(), torch.full((3,), 0.7))


# ---------------------------------------------------------------- masks


def test_expected_sizes_are_the_monte_carlo_means_of_the_sampled_masks(parent):
    config = parent.config
    masks = _random_masks(config)
    expected = {name: size.detach() for name, size in masks.expected_sizes().items()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        samples = [masks.sample(generator=generator) for _ in range(3000)]
    counts = {
        "num_hidden_layers": torch.stack([(s.layer_mask > 0).sum() for s in samples]),
        "hidden_size": torch.stack([(s.hidden_mask > 0).sum() for s in samples]),
        "num_attention_heads": torch.stack([(s.head_mask > 0).sum(-1) for s in samples]),  # (N, L)
        "intermediate_size": torch.stack([(s.neuron_mask > 0).sum(-1) for s in samples]),
    }
    for name, count in counts.items():
        scale = getattr(config, name)
        torch.testing.assert_close(count.float().mean(0) / scale, expected[name] / scale, atol=0.02, rtol=0)
    groups = masks.gates["kv_groups"]
    kept_groups = torch.stack([(groups.sample(generator) > 0).sum(-1) for _ in range(3000)]).float()
    torch.testing.assert_close(kept_groups.mean(0), expected["num_key_value_heads"], atol=0.05, rtol=0)


def test_a_dropped_kv_group_drops_its_query_heads(parent):
    config = parent.config
    masks = PruningMasks(config)
    with torch.no_grad():
        masks.gates["kv_groups"].log_alpha[1, 0] = -100.0
    masked = masks.sample()
    heads = masked.head_mask.view(config.num_hidden_layers, config.num_key_value_heads, -1)  # (L, G, q)
    assert (heads[1, 0] == 0).all() and (heads[1, 1] > 0).any()
    expected = masks.expected_sizes()["num_attention_heads"]
    assert expected[1] < expected[0] / 1.9, "layer 1 expects only its other group's heads"


def test_masks_all_on_run_the_full_model_and_gradients_reach_every_gate(parent):
    masks = PruningMasks(parent.config)
    with torch.no_grad():
        for parameter in masks.parameters():
            parameter.fill_(100.0)
    for training in (True, False):
        masked = masks.sample(training)
        torch.testing.assert_close(parent(INPUT_IDS, shape=masked), parent(INPUT_IDS), atol=2e-5, rtol=1e-5)
    sizes = masks.expected_sizes()
    for name in FIELDS:
        torch.testing.assert_close(sizes[name], torch.full_like(sizes[name], getattr(parent.config, name)))
    torch.testing.assert_close(masks.features(), torch.ones(5))
    masks = _random_masks(parent.config)
    logits = parent(INPUT_IDS, shape=masks.sample(generator=torch.Generator().manual_seed(0)))
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), INPUT_IDS[:, 1:].flatten()).backward()
    for name, gate in masks.gates.items():
        assert gate.log_alpha.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- the Lagrangian


def pruning_control(config, **settings) -> PruningControl:
    """The training loop's pruning controller for HALF, at the masks' and multipliers' default rates."""
    settings = TrainSettings(prune_target=HALF, mask_lr=MASK_LR, lambda_lr=LAMBDA_LR, **settings)
    return PruningControl(settings, SearchSpace.from_fractions(config), torch.device("cpu"))


def pruning_step(control: PruningControl, model, step: int, teacher=None) -> tuple[float, float]:
    """One step as the training loop takes it on INPUT_IDS: the controller's student learns the
    next token (or, given teacher logits, distils them), its penalty added; the masks descend and
    the multipliers ascend. Returns (task loss, penalty)."""
    (student,) = control.students(step, micro=0)
    logits = model(INPUT_IDS, shape=student.shape)
    task = next_token_nll(logits, INPUT_IDS) if teacher is None else distillation_loss("forward-kl", logits, teacher)
    optimizers = [optimizer for _, optimizer in control.companions.values()]
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    (task + student.penalty).backward()
    for optimizer in optimizers:
        optimizer.step()
    return float(task.detach()), float(student.penalty.detach())


def test_expected_sizes_converge_to_the_target(parent):
    torch.manual_seed(0)
    control = pruning_control(parent.config, target_warmup_steps=100)
    target, lagrangian = control.target, control.lagrangian
    assert lagrangian.targets(0) == {name: 1.0 for name in FIELDS}
    assert lagrangian.targets(50)["hidden_size"] == 0.75 and lagrangian.targets(100) == target.fractions(parent.config)
    for step in range(400):
        pruning_step(control, parent, step)
    assert control.metrics(400)["prune"].keys() >= {"expected", "target", "lambda_1", "lambda_2"}
    for name, size in control.masks.expected_sizes().items():
        goal = getattr(target, name)
        assert (size - goal).abs().max() <= 0.02 * goal, (name, size, goal)


@pytest.mark.parametrize("init_keep, direction", [(0.9, 1.0), (0.3, -1.0)], ids=["above-target", "below-target"])
def test_lambdas_move_so_that_the_gap_closes(parent, init_keep, direction):
    """E > T: lambda1 rises, and the Lagrangian then lowers E; E < T: lambda1 falls, and E rises."""
    masks = PruningMasks(parent.config, init_keep=init_keep)
    lagrangian = Lagrangian(parent.config, PruningTarget.from_dict(HALF, parent.config))
    optimizer, ascent = mask_optimizer(masks), lambda_optimizer(lagrangian)

    def mean_gaps() -> torch.Tensor:
        gaps = lagrangian.gaps(masks.expected_fractions(), step=0)
        return torch.stack([gaps[name].mean() for name in FIELDS]).detach()

    before = mean_gaps()
    assert (torch.sign(before) == direction).all()
    lagrangian(masks.expected_fractions(), step=0).backward()
    ascent.step()
    assert (torch.sign(lagrangian.lambda_1.detach()) == direction).all()
    assert (lagrangian.lambda_2.detach() > 0).all()
    optimizer.zero_grad(), ascent.zero_grad()
    lagrangian(masks.expected_fractions(), step=0).backward()
    optimizer.step()
    after = mean_gaps()
    assert (after.abs() < before.abs()).all() and (torch.sign(after) == direction).all()


def test_a_distillation_step_against_the_parent_itself_has_no_task_loss(parent):
    control = pruning_control(parent.config)
    with torch.no_grad():
        for parameter in control.masks.parameters():
            parameter.fill_(100.0)
        teacher = parent(INPUT_IDS)
    task_loss, penalty = pruning_step(control, parent, 0, teacher)
    assert task_loss < 1e-6 and penalty == 0
    assert (control.lagrangian.lambda_1 > 0).all(), "the parent-sized masks are above the target"


# ---------------------------------------------------------------- finalisation


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("llama3-gqa", dict(num_hidden_layers=2, hidden_size=48, num_attention_heads=2, num_key_value_heads=1,
                            intermediate_size=64)),
        ("qwen2-gqa", dict(num_hidden_layers=3, hidden_size=40, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=72)),
    ],
)  # fmt: skip
def test_finalisation_hits_a_config_target_exactly_and_exports_the_masked_model(tiny_dir, tmp_path, name, sizes):
    torch.set_num_threads(1)
    model = anyshape.load(tiny_dir(name))
    kind = LlamaConfig if name.startswith("llama") else Qwen2Config
    kind(vocab_size=256, head_dim=16, **sizes).save_pretrained(tmp_path / "smaller")
    target = PruningTarget.from_config(tmp_path / "smaller" / "config.json", model.config)
    assert target.to_dict() == sizes
    masks = _random_masks(model.config, seed=3)
    with torch.no_grad():
        masks.gates["layers"].log_alpha.copy_(torch.tensor([0.1, 2.0, -1.0, 1.5]))  # ranks 1, 3, 0, 2
    masked = final_masks(masks, target)
    L, G = model.config.num_hidden_layers, model.config.num_key_value_heads
    heads = masked.head_mask.view(L, G, -1)
    assert masked.layer_mask.sum() == target.num_hidden_layers and masked.hidden_mask.sum() == target.hidden_size
    assert (masked.neuron_mask.sum(-1) == target.intermediate_size).all()
    assert ((heads.sum(-1) > 0).sum(-1) == target.num_key_value_heads).all()
    assert set(heads.sum(-1).unique().tolist()) == {0.0, float(target.queries_per_group)}
    shape = final_shape(masks, target)
    assert shape.layers == tuple(sorted((1, 3, 0)[: target.num_hidden_layers]))
    assert shape.layers == tuple(masked.layer_mask.nonzero().flatten().tolist())
    with torch.no_grad():
        expected = model(INPUT_IDS, shape=masked)
    folder, exported_shape = finalize(model, masks, target, tmp_path / "pruned")
    assert exported_shape == shape
    config = json.loads((folder / "config.json").read_text())
    assert {field: config[field] for field in FIELDS} == sizes
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- bad targets


@pytest.mark.parametrize(
    "data, match",
    [
        ({"hidden_size": 128}, "hidden_size=128 is larger than the source model's hidden_size=64; .* at most 64"),
        ({"num_hidden_layers": 5}, "num_hidden_layers=5 is larger .* at most 4"),
        ({"num_hidden_layers": 0}, "num_hidden_layers=0 must be a positive integer"),
        ({"intermediate_size": -8}, "intermediate_size=-8 must be a positive integer"),
        ({"hidden_size": 32.5}, "hidden_size=32.5 must be a positive integer"),
        ({"num_attention_heads": 5, "num_key_value_heads": 2}, "not a multiple of num_key_value_heads=2; .* such as 4"),
        ({"num_attention_heads": 8, "num_key_value_heads": 1}, "8 query heads in each KV group.*use at most 4 heads"),
        ({"layers": [0, 1]}, "unknown pruning target field 'layers'; allowed fields: num_hidden_layers"),
    ],
)
def test_bad_targets_name_the_field_and_the_fix(parent, data, match):
    with pytest.raises(AnyshapeError, match=match):
        PruningTarget.from_dict(data, parent.config)


@pytest.mark.parametrize(
    "config, match",
    [
        (LlamaConfig(vocab_size=256, hidden_size=32, num_attention_heads=4, head_dim=8), "head_dim=8 .* has 16"),
        (LlamaConfig(vocab_size=512, hidden_size=32, num_attention_heads=2, head_dim=16), "vocab_size=512"),
        (
            Qwen2Config(vocab_size=256, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, head_dim=16),
            "model_type='qwen2'",
        ),
    ],
)
def test_a_config_target_of_another_family_is_refused(parent, tmp_path, config, match):
    config.save_pretrained(tmp_path)
    with pytest.raises(AnyshapeError, match=match):
        PruningTarget.parse(tmp_path / "config.json", parent.config)


def test_inline_json_targets_parse(parent):
    assert PruningTarget.parse(json.dumps(HALF), parent.config).to_dict() == HALF
    with pytest.raises(AnyshapeError, match="not valid JSON"):
        PruningTarget.parse("{hidden_size: 32}", parent.config)
