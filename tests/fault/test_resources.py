"""Resource limits: a training step that will not fit is refused before the first batch, with
the estimate in the message; calibration draws too large for memory are refused before they
are allocated."""

from __future__ import annotations

import pytest
import torch

import anyshape
import anyshape.memory
from anyshape.cli import main
from anyshape.data.calibration import random_windows
from anyshape.errors import AnyshapeError
from anyshape.memory import GiB, parse_size, training_memory
from anyshape.model.adapters import add_adapters
from anyshape.model.load import load_config
from anyshape.shape import Shape
from bench.memory import measure_apart
from tests.fault import tally
from tests.unit.test_train import SMALL


@pytest.mark.parametrize(
    "text, size", [("8GiB", 8 * GiB), ("8g", 8 * GiB), ("512MB", 512 * 2**20), ("1.5G", 3 * GiB // 2), ("4096", 4096)]
)
def test_sizes_read_in_binary_units(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "-1G", "0", "8 parsecs", "1e3G", "nan"])
def test_unreadable_sizes_are_refused(text):
    with pytest.raises(AnyshapeError, match="8GiB"):
        parse_size(text)


def test_estimate_grows_with_the_micro_batch_and_the_trainable_parameters(tiny_dir):
    config = load_config(tiny_dir("llama3-gqa"))
    full, parameters = Shape.full(config), Shape.full(config).num_parameters(config)
    one, two = (training_memory(config, full, n, 64, parameters, parameters) for n in (1, 2))
    assert two.activations == 2 * one.activations and two.logits > one.logits
    assert two.weights == one.weights == 4 * parameters and one.optimizer == 12 * parameters
    lone = training_memory(config, full, 1, 64, parameters, parameters, accumulates=False)
    assert lone.optimizer == 8 * parameters  # no gradients held through another backward pass
    plain = training_memory(config, full, 1, 64, parameters, parameters, teacher_logits=False)
    assert one.logits - plain.logits == 64 * config.vocab_size * 4  # the teacher's float32 logits
    frozen = training_memory(config, full, 1, 64, parameters, 0)
    head = config.vocab_size * config.hidden_size * 4  # the head's gradient, only where it learns
    unsaved = 64 * config.hidden_size * (2 * config.num_hidden_layers + 1) * 4  # frozen norms: no normalised inputs
    assert frozen.optimizer == 0 and frozen.total == one.total - one.optimizer - head - unsaved
    recomputed = training_memory(config, full, 1, 64, parameters, parameters, checkpointing=True)
    final_norm = 64 * (2 * config.hidden_size + 1) * 4
    per_layer = (one.activations - final_norm) // config.num_hidden_layers  # what one layer keeps without checkpointing
    assert recomputed.activations == per_layer + 64 * config.hidden_size * config.num_hidden_layers * 4 + final_norm


@pytest.mark.parametrize("adapter", ["full", "lora", "smol"])
@pytest.mark.parametrize("small", [False, True], ids=["full-shape", "small-shape"])
@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16-autocast"])
def test_the_planned_activations_are_what_autograd_saves(tiny_dir, adapter, small, bf16):
    """The plan's activations against the bytes of the tensors autograd saves in a forward pass
    (each storage once, the weights themselves left out), on the CPU."""
    model = anyshape.load(tiny_dir("llama3-gqa"))
    add_adapters(model, adapter, rank=4, experts=3, top_k=2)
    shape = Shape.from_dict(SMALL, model.config) if small else model.full_shape
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (4, 128))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            model.hidden_states(ids, shape)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = training_memory(
        model.config, shape, 4, 128, 0, trainable, adapter, rank=4, top_k=2, autocast_bytes=2 if bf16 else 4
    )
    # the plan also counts what the loss saves beyond hidden_states (the head's cast under autocast)
    assert plan.activations == pytest.approx(sum(saved.values()), rel=0.06)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["2,128,full,largest", "4,256,lora,sandwich", "4,256,full,sandwich"])
def test_the_plan_is_within_ten_percent_of_the_measured_peak_on_smollm2(case):
    """Two steps of SmolLM2-135M in a process of their own (float32, CPU): one Shape, LoRA and
    full sandwich steps; the peak of live memory against the plan train checked."""
    planned, measured = measure_apart(case, "smollm2-135m")
    assert 0.9 <= planned / measured <= 1.1, f"{case}: planned {planned:.2f} GiB, measured {measured:.2f} GiB"


@pytest.mark.integration
@pytest.mark.parametrize("case", ["2,64,full,largest", "4,128,lora,sandwich"])
def test_the_plan_is_within_ten_percent_of_the_measured_peak_on_a_tiny_model(case, tiny_dir):
    """A tiny model's step is mostly the process itself (interpreter, torch, tokenizer): the plan
    measures that rather than assuming a size."""
    planned, measured = measure_apart(case, str(tiny_dir("llama3-gqa")))
    assert 0.9 <= planned / measured <= 1.1, f"{case}: planned {planned:.2f} GiB, measured {measured:.2f} GiB"


def test_a_step_over_max_memory_is_refused_before_the_run_starts(tiny_dir, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text("a small text to train on, repeated. " * 200)
    out = tmp_path / "run"
    argv = ["train", str(tiny_dir("llama3-gqa")), "--data", str(data), "--out", str(out), "--steps", "1"]
    status = main([*argv, "--seq-len", "32", "--max-memory", "64MiB"])
    error = capsys.readouterr().err
    assert status == 2 and error.count("\n") == 1, error
    assert "needs about" in error and "0.1 GiB allowed" in error and "--batch-size" in error, error
    assert not out.exists()
    tally.count("inputs fuzzed")
    assert main([*argv, "--seq-len", "32", "--max-memory", "8GiB", "--save-every", "1", "--eval-every", "1"]) == 0


def test_without_max_memory_the_limit_is_what_is_free(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(anyshape.memory.psutil, "virtual_memory", lambda: _Memory(available=0))
    data = tmp_path / "text.txt"
    data.write_text("a small text to train on, repeated. " * 200)
    out = tmp_path / "run"
    status = main(["train", str(tiny_dir("llama3-gqa")), "--data", str(data), "--out", str(out), "--seq-len", "32"])
    error = capsys.readouterr().err
    assert status == 2 and "needs about" in error and not out.exists(), error
    tally.count("inputs fuzzed")


def test_calibration_windows_too_large_for_memory_are_refused_before_allocating():
    ids = torch.arange(1000)
    with pytest.raises(AnyshapeError, match="--num-sequences"):
        random_windows(ids, 10**12, 512)
    assert random_windows(ids, 4, 16).shape == (4, 16)


class _Memory:
    def __init__(self, available: int):
        self.available = available


def test_fsdp_shards_divide_the_weights_and_optimizer_and_add_one_gathered_layer(tiny_dir):
    config = load_config(tiny_dir("llama3-gqa"))
    full, parameters = Shape.full(config), Shape.full(config).num_parameters(config)
    one = training_memory(config, full, 1, 64, parameters, parameters)
    two = training_memory(config, full, 1, 64, parameters, parameters, shards=2)
    assert two.optimizer == one.optimizer // 2 and two.activations == one.activations
    assert two.weights == one.weights // 2 + parameters // config.num_hidden_layers * 4
