"""A frozen teacher in the training loop (--teacher parent or MODEL) on tiny models."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import anyshape
import anyshape.train.loop as loop
from anyshape import AnyshapeError
from anyshape.memory import training_memory
from anyshape.shape import Shape
from anyshape.train.data import Batches
from anyshape.train.inputs import training_data
from anyshape.train.loop import train
from anyshape.train.run import iterate_metrics
from anyshape.train.settings import TrainSettings
from tests.conftest import TINY, byte_tokenizer
from tests.unit.test_cli import assert_bad_input
from tests.unit.test_train import (  # noqa: F401 (fixtures)
    assert_same_state,
    settings,
    text,
    train_in_one_and_two_processes,
    train_interrupted_and_resumed,
)

OTHER = "llama-mha-tied"  # another architecture of the same byte vocabulary: a teacher given as a PATH


def digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def history(run: TrainSettings) -> list[dict]:
    return list(iterate_metrics(Path(run.out)))


def captured_teacher(monkeypatch) -> list[torch.nn.Module]:
    """The frozen teacher(s) the loop loads, kept for the test to inspect."""
    loaded = []
    load_teacher = loop.load_teacher

    def keep(*args):
        teacher = load_teacher(*args)
        loaded.append(teacher)
        return teacher

    monkeypatch.setattr(loop, "load_teacher", keep)
    return loaded


@pytest.mark.parametrize("teacher", ["parent", "path"])
def test_the_frozen_teacher_is_untouched_by_training(settings, tiny_dir, monkeypatch, hf_perplexity, teacher):  # noqa: F811
    source = Path(settings.model) if teacher == "parent" else tiny_dir(OTHER)
    settings = replace(
        settings, steps=3, lr=1e-2, kd="forward-kl", teacher="parent" if teacher == "parent" else str(source)
    )
    before = digests(source)
    loaded = captured_teacher(monkeypatch)
    train(settings)
    assert len(loaded) == 1 and not any(p.requires_grad for p in loaded[0].parameters()) and not loaded[0].training
    for (name, trained), (_, fresh) in zip(
        loaded[0].state_dict().items(), anyshape.load(source).state_dict().items(), strict=True
    ):
        assert torch.equal(trained, fresh), name
    assert digests(source) == before, "the teacher's folder changed"
    student, parent = anyshape.load(settings.out), anyshape.load(settings.model)
    assert any(not torch.equal(a, b) for a, b in zip(student.parameters(), parent.parameters(), strict=True))
    records = history(settings)
    # the target, logged once at step 0: the teacher's perplexity on the held-out rows every evaluation scores
    data = training_data(settings, TINY["max_position_embeddings"])
    held_out = data.val[: settings.val_batches * settings.batch_size]
    assert records[0]["val_ppl"]["teacher"] == pytest.approx(hf_perplexity(source, held_out), rel=1e-5)
    assert all("teacher" not in record.get("val_ppl", {}) for record in records[1:])
    assert all("teacher" in record["loss"] and "largest" in record["loss"] for record in records if "loss" in record)


@pytest.mark.parametrize("sampling", ["largest", "fixed"])
def test_a_student_equal_to_the_parent_starts_at_zero_kd_loss(settings, sampling):  # noqa: F811
    full = Shape.full(anyshape.load_config(settings.model)).to_dict()
    settings = replace(
        settings, steps=1, teacher="parent", kd="forward-kl", sampling=sampling,
        shapes=(full,) if sampling == "fixed" else (),
    )  # fmt: skip
    train(settings)
    zero, first = history(settings)[:2]
    assert list(first["loss"]) == ["largest", "teacher"]  # the full Shape drawn as fixed-0 trains once, as largest
    assert first["loss"]["largest"] == pytest.approx(0, abs=1e-6)
    assert zero["val_ppl"]["teacher"] == pytest.approx(zero["val_ppl"]["largest"], rel=1e-6)


def test_teacher_largest_is_the_default_and_another_teacher_changes_training(settings):  # noqa: F811
    settings = replace(settings, steps=2, save_every=2, eval_every=2, balance_losses=True)
    runs = {
        name: replace(settings, out=f"{settings.out}-{name}", **extra)
        for name, extra in (("omitted", {}), ("largest", {"teacher": "largest"}), ("parent", {"teacher": "parent"}))
    }
    for run in runs.values():
        train(run)
    omitted, largest, parent = (anyshape.load(run.out).state_dict() for run in runs.values())
    assert all(torch.equal(omitted[name], largest[name]) for name in omitted)
    assert any(not torch.equal(omitted[name], parent[name]) for name in omitted), "the teacher setting did nothing"
    assert [{k: r[k] for k in ("loss", "grad_norm")} for r in history(runs["omitted"]) if "loss" in r] == [
        {k: r[k] for k in ("loss", "grad_norm")} for r in history(runs["largest"]) if "loss" in r
    ]


def test_the_balancer_aims_at_the_teachers_loss(settings, hf_perplexity):  # noqa: F811
    settings = replace(settings, steps=1, teacher="parent", balance_losses=True, kd="forward-kl")
    train(settings)
    means = json.loads((Path(settings.out) / "checkpoint" / "state.json").read_text())["balancer"]["means"]
    assert next(iter(means)) == "teacher" and "largest" in means
    first = history(settings)[1]["loss"]
    assert means["teacher"] == pytest.approx(first["teacher"])
    # the parent's next-token loss on the first step's batch, as transformers computes it
    batch = Batches(training_data(settings, TINY["max_position_embeddings"]).train, settings.batch_size, settings.seed)
    assert first["teacher"] == pytest.approx(math.log(hf_perplexity(settings.model, batch.batch(0))), rel=1e-5)


def test_a_run_with_a_frozen_teacher_resumes_exactly(settings):  # noqa: F811
    settings = replace(settings, teacher="parent", kd="forward-kl", balance_losses=True)
    reference = train_interrupted_and_resumed(settings, 4)
    assert_same_state(anyshape.load(settings.out), anyshape.load(reference.out))


@pytest.mark.integration
@pytest.mark.parametrize("distributed", ["ddp", "fsdp"])
def test_two_processes_with_a_frozen_teacher_train_like_one(settings, distributed):  # noqa: F811
    settings = replace(settings, steps=3, grad_accum=2, distributed=distributed, teacher="parent", kd="forward-kl")
    single = train_in_one_and_two_processes(settings)
    assert_same_state(anyshape.load(settings.out), anyshape.load(single.out), atol=1e-5, rtol=1e-4)
    trained, parent = anyshape.load(single.out), anyshape.load(settings.model)
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), parent.parameters(), strict=True))


def save_tiny(folder: Path, tokenizer: PreTrainedTokenizerFast, **config) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        LlamaConfig(**(TINY | config), num_attention_heads=4, num_key_value_heads=4)
    )  # fmt: skip
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def reversed_byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens, like conftest's byte tokenizer, but numbered the other way round."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={symbol: 255 - index for index, symbol in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


@pytest.mark.parametrize(
    ("teacher", "words"),
    [
        ("missing", ("teacher", "not found", "pass a Hugging Face folder")),
        ("vocabulary", ("teacher", "vocabulary of 300 tokens", "one of 256", "--teacher parent")),
        ("tokenizer", ("teacher", "tokenizer numbers its tokens otherwise", "--teacher parent")),
        ("context", ("teacher", "context of 16 tokens", "--seq-len 16")),
    ],
)
def test_a_bad_teacher_is_refused_before_the_student_loads(settings, tmp_path, monkeypatch, teacher, words):  # noqa: F811
    path = {
        "missing": lambda: tmp_path / "missing",
        "vocabulary": lambda: save_tiny(tmp_path / "vocabulary", byte_tokenizer(), vocab_size=300),
        "tokenizer": lambda: save_tiny(tmp_path / "tokenizer", reversed_byte_tokenizer()),
        "context": lambda: save_tiny(tmp_path / "context", byte_tokenizer(), max_position_embeddings=16),
    }[teacher]()

    def no_student(*args, **kwargs):
        raise AssertionError("the student loaded before the teacher was checked")

    monkeypatch.setattr(loop, "load", no_student)
    with pytest.raises(AnyshapeError) as error:
        train(replace(settings, teacher=str(path)))
    message = str(error.value)
    assert "\n" not in message
    assert all(word.lower() in message.lower() for word in words), message
    assert not Path(settings.out).exists(), "a refused run left a run folder"


def test_a_bad_teacher_exits_2_with_one_line(capsys, settings, tmp_path):  # noqa: F811
    args = ["train", settings.model, "--data", settings.data, "--out", settings.out, "--steps", "1", "--seq-len", "32"]
    assert_bad_input(capsys, [*args, "--align", "16", "--teacher", tmp_path / "missing"], "teacher", "not found")
    config = tmp_path / "teacher.yaml"  # a config file sets it too
    config.write_text(f"teacher: {tmp_path / 'missing'}\nsteps: 1\nseq_len: 32\nalign: 16\n")
    args = ["train", settings.model, "--config", config, "--data", settings.data, "--out", settings.out]
    assert_bad_input(capsys, args, "teacher", "not found")


def test_an_empty_teacher_setting_is_refused():
    with pytest.raises(AnyshapeError, match="teacher is empty; give largest"):
        TrainSettings(teacher=" ").check()


def test_the_memory_estimate_counts_the_teacher(settings, monkeypatch):  # noqa: F811
    config = anyshape.load_config(settings.model)
    full = Shape.full(config)
    parameters = full.num_parameters(config)
    alone = training_memory(config, full, 2, 32, parameters, parameters)
    taught = training_memory(
        config, full, 2, 32, parameters, parameters, teacher_parameters=10, teacher_bytes_per_value=2
    )
    assert taught.total - alone.total == taught.teacher == 20 and "teacher" in taught.describe()
    assert "teacher" not in alone.describe()
    seen = []
    estimate = loop.training_memory

    def spy(*args, **kwargs):
        seen.append(estimate(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(loop, "training_memory", spy)
    monkeypatch.setattr(loop, "runtime_bytes", lambda *args: 0)  # the process's own memory moves between runs
    train(replace(settings, steps=1, teacher="parent"))
    assert seen[0].teacher == parameters * 4  # the parent's weights in float32: the run does not autocast on the CPU
    between = str(seen[0].total - seen[0].teacher // 2)  # bytes: enough for the student alone, not with its teacher
    train(replace(settings, steps=1, out=settings.out + "-alone", max_memory=between))
    with pytest.raises(AnyshapeError, match=r"teacher \d"):  # the refusal names the teacher's part
        train(replace(settings, steps=1, teacher="parent", out=settings.out + "-taught", max_memory=between))
