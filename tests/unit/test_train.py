"""One-for-all elastic training on a tiny model: losses, sampling, adapters, resume."""

from __future__ import annotations

import json
import math
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoModelForCausalLM, LlamaConfig

import anyshape
from anyshape import AnyshapeError, Shape
from anyshape.model.adapters import add_adapters, merged
from anyshape.model.nll import next_token_loss
from anyshape.search.space import SearchSpace
from anyshape.train.controller import ControllerFactory
from anyshape.train.distill import KD_LOSSES, LossBalancer, distillation_loss
from anyshape.train.loop import learning_rate_factor, train
from anyshape.train.run import iterate_metrics
from anyshape.train.sampling import ShapeSampler, parameter_bins
from anyshape.train.settings import TrainSettings

PARENT = "llama3-gqa"  # 4 layers, hidden 64, 8 query heads in 2 groups, MLP 96
SMALL = {
    "layers": [0, 1],
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 48,
}
INPUT_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "train.txt"
    sentences = [f"Sentence {i} says that {i % 7} plus {i % 5} is {i % 7 + i % 5}." for i in range(300)]
    path.write_text(" ".join(sentences))
    return path


@pytest.fixture
def settings(tiny_dir, text, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    return TrainSettings(
        model=str(tiny_dir(PARENT)), data=str(text), out=str(tmp_path / "run"), steps=6, seq_len=32, batch_size=4,
        align=16, fractions=(0.5, 1.0), save_every=3, eval_every=3, warmup_steps=2,
    )  # fmt: skip


@pytest.mark.parametrize("kind", KD_LOSSES)
def test_kd_loss_is_zero_for_equal_logits_and_has_correct_gradients(kind):
    teacher = torch.randn(2, 3, 7, dtype=torch.float64)
    assert distillation_loss(kind, teacher.clone(), teacher).abs().item() < 1e-6
    student = torch.randn(2, 3, 7, dtype=torch.float64)
    assert distillation_loss(kind, student, teacher).item() > 1e-3
    student.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: distillation_loss(kind, s, teacher), (student,))


def test_kd_loss_unknown_kind():
    with pytest.raises(AnyshapeError, match="choose one of forward-kl"):
        distillation_loss("kl", torch.zeros(1, 1, 2), torch.zeros(1, 1, 2))


def test_loss_balancer_equalises_magnitudes_and_round_trips():
    balancer = LossBalancer(momentum=0.5)
    balancer.update("largest", 2.0)
    balancer.update("smallest", 8.0)
    assert balancer.scale("largest") == 1.0 and balancer.scale("smallest") == 0.25
    balancer.update("smallest", 4.0)  # running mean 6
    assert balancer.scale("smallest") == pytest.approx(2 / 6)
    restored = LossBalancer()
    restored.load_state_dict(json.loads(json.dumps(balancer.state_dict())))
    assert restored.scale("smallest") == balancer.scale("smallest")


def test_learning_rate_warms_up_then_decays_to_the_floor():
    factors = [learning_rate_factor(step, 2, 10, 0.1) for step in range(11)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:], strict=False))
    assert factors[10] == pytest.approx(0.1)


def test_sampler_sandwich_grid_and_fixed(tiny_dir):
    config = anyshape.load_config(tiny_dir(PARENT))
    space = SearchSpace.from_fractions(config, (0.25, 0.5, 0.75, 1.0), align=8)
    sandwich = ShapeSampler(space, "sandwich", 3, seed=5)
    first = sandwich.shapes(0)
    assert [slot for slot, _ in first] == ["largest", "smallest", "random-0", "random-1", "random-2"]
    assert first[0][1] == space.largest() and first[1][1] == space.smallest()
    assert sandwich.shapes(0) == ShapeSampler(space, "sandwich", 3, seed=5).shapes(0)  # a function of (seed, step)
    assert any(sandwich.shapes(s)[2:] != first[2:] for s in range(1, 5))
    grid = ShapeSampler(space, "grid", 4)
    params = [shape.num_parameters(config) for _, shape in grid.shapes(3)[1:]]
    assert params == sorted(params), "one Shape per parameter bin, in bin order"
    bins = parameter_bins(space, 4)
    assert sum(len(b) for b in bins) == len(space)
    fixed = ShapeSampler(space, "fixed", fixed=[Shape.from_dict(SMALL, config)])
    assert fixed.shapes(7) == [("largest", space.largest()), ("fixed-0", Shape.from_dict(SMALL, config))]
    with pytest.raises(AnyshapeError, match="--shapes"):
        ShapeSampler(space, "fixed")
    members = [Shape.from_dict(SMALL, config)]
    joined, plain = ShapeSampler(space, "sandwich", 1, members, seed=5), ShapeSampler(space, "sandwich", 1, seed=5)
    for step in range(5):  # given Shapes join each step, after the rule's own
        shapes, own = [s for _, s in joined.shapes(step)], [s for _, s in plain.shapes(step)]
        assert members[0] in shapes and shapes[: len(own)] == own
    assert [shape for _, shape in ShapeSampler(space, "largest", fixed=members).shapes(0)] == [space.largest()]


@pytest.mark.parametrize("kind", ["lora", "smol"])
def test_adapters_slice_with_the_shape_and_merge_exactly(tiny_dir, kind):
    model = anyshape.load(tiny_dir(PARENT))
    trainable = add_adapters(model, kind, rank=4, experts=3, top_k=2)
    assert all(p.requires_grad for p in trainable) and not model.model.embed_tokens.weight.requires_grad
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in trainable:  # B starts at zero: give every adapter a non-zero update
            parameter.normal_(0, 0.2)
    for shape in (model.full_shape, Shape.from_dict(SMALL, model.config)):
        with torch.no_grad():
            adapted = model(INPUT_IDS, shape)
            plain = merged(model, shape)
            assert not any(p.adapter is not None for p in plain.modules() if hasattr(p, "adapter"))
            torch.testing.assert_close(plain(INPUT_IDS, shape), adapted, atol=1e-5, rtol=1e-5)
            assert (adapted - anyshape.load(tiny_dir(PARENT))(INPUT_IDS, shape)).abs().max() > 1e-3


def test_every_sampled_shape_learns(settings):
    result = train(replace(settings, steps=30, lr=3e-3, save_every=30, eval_every=30, kd="none"))
    history = [record for record in iterate_metrics(Path(settings.out)) if "loss" in record]
    assert len(history) == 30 and result["step"] == 30
    for slot in ("largest", "smallest", "random-0", "random-1"):
        losses = [record["loss"][slot] for record in history if slot in record["loss"]]  # duplicates train once
        first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
        assert last < 0.8 * first, f"{slot}: mean loss {first:.3f} over the first 5 steps, {last:.3f} over the last 5"


def test_in_place_distillation_improves_the_students(settings):
    train(replace(settings, steps=30, lr=3e-3, save_every=30, eval_every=30, kd="forward-kl"))
    evaluations = [record["val_ppl"] for record in iterate_metrics(Path(settings.out)) if "val_ppl" in record]
    assert len(evaluations) == 2  # step 0 (zero-shot) and the end
    for slot in ("largest", "smallest"):
        assert evaluations[1][slot] < 0.8 * evaluations[0][slot], f"{slot}: {evaluations}"


def train_interrupted_and_resumed(
    settings: TrainSettings, interrupt_after: int, controller: ControllerFactory | None = None
) -> TrainSettings:
    """Trains `settings` uninterrupted into OUT-reference (returned), and into OUT interrupted by
    Ctrl-C after step `interrupt_after` (checking that the interrupt saved that step), then resumed."""
    reference = replace(settings, out=settings.out + "-reference")
    train(reference, controller=controller)

    def interrupt(step: int) -> None:
        if step == interrupt_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(settings, on_step=interrupt, controller=controller)
    assert json.loads((Path(settings.out) / "checkpoint" / "state.json").read_text())["step"] == interrupt_after
    train(settings, resume=True, controller=controller)
    return reference


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("adapter", ["full", "smol"])
def test_killed_and_resumed_run_ends_with_the_same_weights(settings, adapter):
    settings = replace(settings, adapter=adapter, balance_losses=True, lora_rank=4)
    reference = train_interrupted_and_resumed(settings, 4)
    assert_same_state(anyshape.load(settings.out), anyshape.load(reference.out))


def test_resume_refuses_other_settings_and_a_new_run_refuses_an_old_one(settings):
    train(replace(settings, steps=1))
    with pytest.raises(AnyshapeError, match=r"other settings \(lr"):
        train(replace(settings, steps=1, lr=0.5), resume=True)
    with pytest.raises(AnyshapeError, match="--resume"):
        train(replace(settings, steps=1))


@pytest.mark.parametrize("adapter", ["lora", "smol"])
def test_trained_run_extracts_to_a_plain_hf_model(settings, adapter, tmp_path):
    settings = replace(settings, adapter=adapter, steps=2, lr=1e-2, lora_rank=4)
    train(settings)
    model = anyshape.load(settings.out)
    shape = Shape.from_dict(SMALL, model.config)
    anyshape.export_hf(model, shape, tmp_path / "small")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "small")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, model(INPUT_IDS, shape), atol=1e-5, rtol=1e-5)
        parent = anyshape.load(settings.model)
        assert (model(INPUT_IDS, shape) - parent(INPUT_IDS, shape)).abs().max() > 1e-4, "training changed nothing"


def _train_as_rank(
    rank: int, world_size: int, port: int, settings: TrainSettings, controller: ControllerFactory | None
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )  # fmt: skip
    torch.set_num_threads(1)
    train(settings, controller=controller)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_in_one_and_two_processes(
    settings: TrainSettings, controller: ControllerFactory | None = None
) -> TrainSettings:
    """Trains `settings` in 2 processes (gloo) into OUT, and in 1 into OUT-single (returned)."""
    single = replace(settings, out=settings.out + "-single")
    train(single, controller=controller)
    torch.multiprocessing.spawn(_train_as_rank, args=(2, free_port(), settings, controller), nprocs=2)
    return single


@pytest.mark.integration
@pytest.mark.parametrize(
    ("distributed", "adapter"), [("ddp", "full"), ("ddp", "smol"), ("fsdp", "full"), ("fsdp", "lora"), ("fsdp", "smol")]
)
def test_two_processes_train_the_same_weights_as_one(settings, distributed, adapter):
    settings = replace(settings, steps=3, grad_accum=2, distributed=distributed, adapter=adapter, lora_rank=4)
    single = train_in_one_and_two_processes(settings)
    assert_same_state(anyshape.load(settings.out), anyshape.load(single.out), atol=1e-5, rtol=1e-4)
    parent = anyshape.load(settings.model)
    assert not torch.equal(anyshape.load(single.out)(INPUT_IDS), parent(INPUT_IDS)), "training changed nothing"


def _load_shard_as_rank(rank: int, world_size: int, port: int, folder: Path, out: Path) -> None:
    """Loads `folder` as an FSDP run does, sharded over 2 gloo processes; writes to `out` the
    growth of this process's peak resident memory while loading, and whether its shard equals
    the rows of the whole model."""
    import torch.distributed.fsdp  # noqa: F401  (imported before the measurement: its code is not the model)

    from anyshape.model.llama import ElasticLlama
    from anyshape.model.load import row_reader
    from anyshape.train.distributed import Distributed, fill_shards, process_group, wrap

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )  # fmt: skip
    world, device = Distributed.from_environment(), torch.device("cpu")
    with process_group(world, device):
        rows = row_reader(folder)
        before = _resident_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
        with torch.device("meta"):
            model = ElasticLlama(anyshape.load_config(folder))
        fill_shards(wrap(model, device, world, "fsdp", adapters=False), rows, device)
        grown = (_resident_kib("VmHWM") - before) * 1024
        whole = dict(anyshape.load(folder).named_parameters())
        same = all(
            torch.equal(p.to_local(), whole[name][rank * -(-p.shape[0] // 2) :][: p.to_local().shape[0]])
            for name, p in model.named_parameters()
        )
        out.with_suffix(f".{rank}").write_text(json.dumps({"grown": grown, "same": same}))


def _resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, KiB (Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the peak resident memory (Linux)")
def test_fsdp_processes_read_only_their_shard_of_the_weights(tmp_path):
    config = LlamaConfig(vocab_size=512, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "model")
    full = sum(p.numel() for p in model.parameters()) * 4  # 541 MB in float32: a process's overhead is small beside it
    del model
    out = tmp_path / "result"
    torch.multiprocessing.spawn(_load_shard_as_rank, args=(2, free_port(), tmp_path / "model", out), nprocs=2)
    for rank in range(2):
        result = json.loads(out.with_suffix(f".{rank}").read_text())
        assert result["same"], f"process {rank}'s shard differs from the whole model's rows"
        assert result["grown"] < 0.6 * full, f"process {rank} grew by {result['grown'] / full:.2f} of a full copy"


@pytest.mark.integration
def test_compiled_layers_train_the_same_losses_and_other_widths_do_not_recompile(settings):
    from torch._dynamo.utils import counters

    train(replace(settings, steps=3))
    train(replace(settings, steps=3, compile=True, out=settings.out + "-compiled"))
    eager, compiled = (
        [record["loss"] for record in iterate_metrics(Path(out)) if "loss" in record]
        for out in (settings.out, settings.out + "-compiled")
    )
    assert len(eager) == len(compiled) == 3
    for plain, fast in zip(eager, compiled, strict=True):
        assert plain.keys() == fast.keys()
        assert all(fast[slot] == pytest.approx(plain[slot], rel=1e-4) for slot in plain)

    model = anyshape.load(settings.model).train()
    for layer in model.model.layers:
        layer.compile(dynamic=True)

    def step(hidden: int, ffn: int) -> None:
        shape = Shape.from_dict({"hidden_size": hidden, "intermediate_size": ffn}, model.config)
        model(INPUT_IDS, shape, loss=next_token_loss(INPUT_IDS)).backward()

    step(64, 96), step(48, 80)  # the first width compiles, the second recompiles with sizes dynamic
    graphs = counters["stats"]["unique_graphs"]
    for hidden, ffn in [(32, 48), (16, 64), (56, 32), (40, 96)]:
        step(hidden, ffn)
    assert counters["stats"]["unique_graphs"] == graphs, "a new width compiled again"


def test_a_step_with_a_non_finite_gradient_is_skipped_and_said(settings, monkeypatch):
    import anyshape.train.loop as loop

    poison = {"on": False}
    next_token_loss = loop.next_token_loss

    def poisoned(ids):
        loss = next_token_loss(ids)
        return lambda hidden, weight: loss(hidden, weight) * (math.nan if poison["on"] else 1.0)

    def after(step: int) -> None:
        poison["on"] = step == 1  # step 2's losses are NaN

    monkeypatch.setattr(loop, "next_token_loss", poisoned)
    said = []
    train(replace(settings, steps=3, kd="none"), log=said.append, on_step=after)
    history = [record for record in iterate_metrics(Path(settings.out)) if "loss" in record]
    assert [record["skipped"] for record in history] == [False, True, False]
    assert any("step 2" in line and "skipped" in line for line in said)
    assert all(torch.isfinite(p).all() for p in anyshape.load(settings.out).parameters())


class _HostReads(TorchFunctionMode):
    """Counts anyshape's reads of a tensor's values into Python (each one a host sync on a GPU;
    torch's own, e.g. AdamW's of its step counters on the CPU, are not anyshape's to remove, and
    the Shape sampler's draws from a CPU generator never touch the device)."""

    READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")
    TORCH, ANYSHAPE = Path(torch.__file__).parent, Path(anyshape.__file__).parent
    TENSOR_METHODS = (str(TORCH / "_tensor.py"), str(TORCH / "overrides.py"))
    SAMPLER = str(ANYSHAPE / "train" / "sampling.py")

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            caller = sys._getframe(1)
            while caller.f_code.co_filename in self.TENSOR_METHODS:
                caller = caller.f_back
            where = caller.f_code.co_filename
            self.count += where.startswith(str(self.ANYSHAPE)) and where != self.SAMPLER
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("sampling", "adapter"), [("largest", "full"), ("sandwich", "full"), ("sandwich", "lora"), ("sandwich", "smol")]
)
def test_a_training_step_reads_the_device_once(settings, sampling, adapter):
    """Losses, gradient norm, the skip check and per-Shape timing share one read a step, as
    a plain loop that logs its loss has: no stall between a step's Shapes."""
    reads = _HostReads()
    at_step = {}
    with reads:
        train(
            replace(settings, steps=3, sampling=sampling, adapter=adapter, grad_accum=2),
            on_step=lambda s: at_step.update({s: reads.count}),
        )
    assert at_step[2] - at_step[1] == 1


def test_activation_checkpointing_gives_the_same_gradients_and_training(settings, tiny_dir):
    model = anyshape.load(tiny_dir(PARENT))
    shape = Shape.from_dict(SMALL, model.config)
    gradients = []
    for recompute in (False, True):
        model.zero_grad()
        model.checkpoint_layers = recompute
        model(INPUT_IDS, shape).logsumexp(-1).mean().backward()
        gradients.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(gradients[0]) == len(gradients[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*gradients, strict=True)), "the backward recomputes the same layers"
    plain = train(replace(settings, out=settings.out + "-plain"))
    recomputed = train(replace(settings, activation_checkpointing=True))
    assert recomputed["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert_same_state(anyshape.load(settings.out), anyshape.load(settings.out + "-plain"))
