"""Dynamic batch loading: the domains option, reference losses, the seeded and resumable mixture
of domains, the Sheared LLaMA weight update and held-out losses per domain."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from anyshape import DataError
from anyshape.model.load import load
from anyshape.model.nll import mean_nll
from anyshape.shape import Shape
from anyshape.train.data import TrainingData
from anyshape.train.domains import (
    DomainMixture,
    build_domain_data,
    held_out_losses,
    parse_domains,
    read_reference_losses,
    reference_losses_from_model,
)
from tests.conftest import byte_tokenizer

STRIDE = 1000  # row r of domain k holds the token k * STRIDE + r


def numbered(sizes: dict[str, int], length: int = 4) -> dict[str, TrainingData]:
    """Domains whose every sequence names its domain (position k) and row: all tokens k * STRIDE + row."""
    return {
        name: TrainingData(
            train=(k * STRIDE + torch.arange(size)).unsqueeze(1).expand(size, length).clone(),
            val=torch.full((2, length), k * STRIDE + 999),
        )
        for k, (name, size) in enumerate(sizes.items())
    }


def domain_of(rows: torch.Tensor) -> list[int]:
    return (rows[:, 0] // STRIDE).tolist()


def test_domains_are_parsed_in_order_and_local_sources_checked(tmp_path):
    (tmp_path / "code.jsonl").write_text('{"text": "x = 1"}\n')
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text("Once upon a time.")
    spec = f" code = {tmp_path / 'code.jsonl'},books={tmp_path / 'books'},web=org/some-dataset:train"
    assert parse_domains(spec) == {
        "code": str(tmp_path / "code.jsonl"),
        "books": str(tmp_path / "books"),
        "web": "org/some-dataset:train",  # a dataset name: checked when it is read
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (" ", "no domains given"),
        ("code", "domain 'code' has no '='"),
        ("code=a.txt,web", "domain 'web' has no '='"),
        ("=a.txt", "empty name or source"),
        ("code=", "empty name or source"),
        ("code=a.txt,code=a.txt", "domain 'code' is given twice"),
        ("code=missing.jsonl", "domain 'code': data file '.*missing.jsonl' not found"),
        ("books=empty", "domain 'books': folder .*empty has no .txt"),
    ],
)
def test_bad_domain_specs_are_refused_with_the_fix(tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=message):
        parse_domains(spec)


def test_reference_losses_are_read_in_domain_order(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"web": 2.5, "code": 1}))
    losses = read_reference_losses(path, ["code", "web"])
    assert losses == {"code": 1.0, "web": 2.5} and list(losses) == ["code", "web"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "unreadable"),
        ("[1.0, 2.0]", "hold a list"),
        ('{"code": 1.0}', r"no loss for domain\(s\) web; give one loss for each of code, web"),
        ('{"code": 1.0, "web": 2.0, "math": 1.0, "wiki": 1.0}', r"unknown domain\(s\) math, wiki"),
        ('{"web": 2.0, "books": 1.0}', r"no loss for domain\(s\) code; unknown domain\(s\) books"),
        ('{"code": NaN, "web": 2.0}', "domain 'code' has nan"),
        ('{"code": 1.0, "web": -0.5}', "domain 'web' has -0.5"),
        ('{"code": "1.0", "web": 2.0}', "domain 'code' has '1.0'"),
        ('{"code": true, "web": 2.0}', "domain 'code' has True"),
    ],
)
def test_bad_reference_losses_are_refused_by_name(tmp_path, text, message):
    path = tmp_path / "ref.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_reference_losses(path, ["code", "web"])
    with pytest.raises(DataError, match="no-such.json' are unreadable"):
        read_reference_losses(tmp_path / "no-such.json", ["code"])


def test_initial_weights_follow_the_domain_sizes_or_are_uniform():
    data = numbered({"a": 10, "b": 30, "c": 60})
    assert DomainMixture(data, 4, seed=0).weights == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6})
    assert DomainMixture(data, 4, seed=0, initial="uniform").weights == pytest.approx(dict.fromkeys("abc", 1 / 3))


def test_a_domain_far_above_its_reference_is_up_weighted():
    mixture = DomainMixture(numbered({"a": 10, "b": 30, "c": 60}), 4, seed=0, eta=1.0, smoothing=0.0)
    before = mixture.weights
    losses = {"a": 5.0, "b": 2.0, "c": 1.5}  # a: 3 nats above its reference; b at it; c below it
    after = mixture.update(losses, {"a": 2.0, "b": 2.0, "c": 2.0}, batch=10)
    assert math.fsum(after.values()) == pytest.approx(1.0, abs=1e-12)
    total = 0.1 * math.exp(3.0) + 0.3 + 0.6
    assert after == pytest.approx({"a": 0.1 * math.exp(3.0) / total, "b": 0.3 / total, "c": 0.6 / total})
    assert after["a"] > 0.5 > before["a"]
    assert after["b"] < before["b"] and after["c"] < before["c"]
    assert after["b"] / after["c"] == pytest.approx(before["b"] / before["c"])  # no credit for being below
    assert mixture.history[-1]["weights"] == after and mixture.history[-1]["batch"] == 10

    same = mixture.update({"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 2.0, "b": 2.0, "c": 2.0}, batch=20)
    assert same == pytest.approx(after)  # every domain at or below its reference: nothing moves


def test_the_step_size_and_smoothing_keep_every_domain_alive():
    mixture = DomainMixture(numbered({"a": 1, "b": 1}), 4, seed=0, eta=0.5, smoothing=0.01)
    weights = mixture.update({"a": 2.0, "b": 0.0}, {"a": 0.0, "b": 0.0}, batch=0)
    raw = math.exp(1.0) / (math.exp(1.0) + 1)  # eta x excess = 1 nat
    assert weights["a"] == pytest.approx(0.99 * raw + 0.005)
    for _ in range(50):
        weights = mixture.update({"a": 100.0, "b": 0.0}, {"a": 0.0, "b": 0.0}, batch=0)
    assert weights["b"] >= 0.005 and math.fsum(weights.values()) == pytest.approx(1.0)


def test_batches_are_a_function_of_the_seed_index_and_history():
    data = numbered({"a": 7, "b": 5, "c": 3})
    mixture = DomainMixture(data, 6, seed=3)
    first = [mixture.batch(i) for i in range(12)]
    assert torch.equal(mixture.batch(4), first[4])  # asked again, out of order
    assert torch.equal(DomainMixture(data, 6, seed=3).batch(11), first[11])  # without the batches before it
    assert not torch.equal(DomainMixture(data, 6, seed=4).batch(0), first[0])
    assert all(batch.shape == (6, 4) for batch in first)


def test_a_mixture_restored_mid_run_replays_the_uninterrupted_run():
    data = numbered({"a": 7, "b": 5, "c": 3})
    reference = {"a": 1.0, "b": 1.0, "c": 1.0}
    updates = {10: {"a": 4.0, "b": 1.0, "c": 0.5}, 20: {"a": 1.0, "b": 1.0, "c": 3.0}}

    def run(mixture, start, stop):
        batches = []
        for index in range(start, stop):
            if index in updates:
                mixture.update(updates[index], reference, batch=index)
            batches.append(mixture.batch(index))
        return batches

    uninterrupted = DomainMixture(data, 4, seed=0)
    expected = run(uninterrupted, 0, 30)
    interrupted = DomainMixture(data, 4, seed=0)
    run(interrupted, 0, 15)
    saved = json.loads(json.dumps(interrupted.state_dict()))  # as state.json stores it
    resumed = DomainMixture(data, 4, seed=0)
    resumed.load_state_dict(saved)
    replayed = run(resumed, 15, 30)
    assert all(torch.equal(a, b) for a, b in zip(expected[15:], replayed, strict=True))
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert set(domain_of(torch.cat(expected[20:]))) == {0, 1, 2}  # the mixture really changed and mixes


def test_an_update_counts_the_rows_of_batches_it_never_drew():
    data = numbered({"a": 7, "b": 5})
    drew, skipped = DomainMixture(data, 4, seed=0), DomainMixture(data, 4, seed=0)
    for index in range(10):
        drew.batch(index)
    for mixture in (drew, skipped):  # e.g. a run resumed at batch 10 updates before it draws
        mixture.update({"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, batch=10)
    assert drew.state_dict() == skipped.state_dict()
    assert sum(drew.history[-1]["consumed"].values()) == 40
    assert all(torch.equal(drew.batch(index), skipped.batch(index)) for index in range(10, 20))


def test_a_state_of_other_domains_or_seed_is_refused():
    mixture = DomainMixture(numbered({"a": 3, "b": 3}), 4, seed=0)
    for other in (
        DomainMixture(numbered({"a": 3, "c": 3}), 4, seed=0),
        DomainMixture(numbered({"a": 3, "b": 3}), 4, 1),
    ):
        with pytest.raises(DataError, match="resume with the same --domains"):
            other.load_state_dict(mixture.state_dict())


def test_the_rows_of_each_domain_follow_the_weights():
    mixture = DomainMixture(numbered({"a": 10, "b": 30, "c": 60}), 8, seed=0)
    rows = torch.cat([mixture.batch(i) for i in range(400)])  # 3,200 rows
    shares = torch.bincount(torch.tensor(domain_of(rows)), minlength=3) / len(rows)
    assert shares.tolist() == pytest.approx([0.1, 0.3, 0.6], abs=0.025)

    mixture.update({"a": 1.0 + math.log(9.0), "b": 1.0, "c": 1.0}, dict.fromkeys("abc", 1.0), batch=400)
    assert mixture.weights["a"] == pytest.approx(0.5, abs=1e-3)  # 0.1 x 9 = 0.9 of 1.8
    rows = torch.cat([mixture.batch(i) for i in range(400, 800)])
    shares = torch.bincount(torch.tensor(domain_of(rows)), minlength=3) / len(rows)
    assert shares.tolist() == pytest.approx([0.5, 1 / 6, 1 / 3], abs=0.025)


def test_each_domain_gives_every_sequence_once_per_epoch_across_updates():
    sizes = {"a": 9, "b": 4}
    mixture = DomainMixture(numbered(sizes), 5, seed=2, initial="uniform")
    rows = []
    for index in range(60):
        if index == 25:
            mixture.update({"a": 3.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, batch=index)
        rows.append(mixture.batch(index)[:, 0])
    drawn = torch.cat(rows).tolist()
    for k, (name, size) in enumerate(sizes.items()):
        stream = [token - k * STRIDE for token in drawn if token // STRIDE == k]
        assert len(stream) >= 3 * size, name
        for epoch in range(len(stream) // size):
            assert sorted(stream[epoch * size : (epoch + 1) * size]) == list(range(size)), (name, epoch)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"initial": "equal"}, "unknown initial weights 'equal'; choose one of tokens, uniform"),
        ({"eta": 0.0}, "eta must be a positive number"),
        ({"smoothing": 1.0}, r"smoothing must be in \[0, 1\)"),
        ({"batch_size": 0}, "batch size must be at least 1"),
    ],
)
def test_bad_mixture_options_are_refused(kwargs, message):
    with pytest.raises(DataError, match=message):
        DomainMixture(numbered({"a": 2}), **{"batch_size": 4, "seed": 0, **kwargs})


def test_domains_of_other_lengths_and_incomplete_updates_are_refused():
    data = {**numbered({"a": 2}), "b": numbered({"b": 2}, length=8)["b"]}
    with pytest.raises(DataError, match="sequences of one length"):
        DomainMixture(data, 4, seed=0)
    mixture = DomainMixture(numbered({"a": 2, "b": 2}), 4, seed=0)
    with pytest.raises(DataError, match="losses .* must hold one finite loss for each of a, b"):
        mixture.update({"a": 1.0}, {"a": 1.0, "b": 1.0}, batch=0)
    mixture.update({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, batch=8)
    with pytest.raises(DataError, match="last changed at batch 8"):
        mixture.update({"a": 1.0, "b": 1.0}, {"a": 1.0, "b": 1.0}, batch=7)


@pytest.fixture(scope="module")
def model_and_mixture(tiny_dir, tmp_path_factory):
    """The tiny Llama and a mixture of two text domains, tokenized by bytes into 16-token sequences."""
    folder = tmp_path_factory.mktemp("domains")
    (folder / "code.txt").write_text("def add(a, b):\n    return a + b\n" * 20)
    (folder / "prose.jsonl").write_text(
        "".join(json.dumps({"text": f"Paragraph {i} tells of a quiet town by the sea."}) + "\n" for i in range(12))
    )
    domains = parse_domains(f"code={folder / 'code.txt'},prose={folder / 'prose.jsonl'}")
    data = build_domain_data(byte_tokenizer(), domains, 16, folder / "cache", val_fraction=0.2, seed=0)
    return load(tiny_dir("llama-mha-tied")), DomainMixture(data, 4, seed=0)


def test_reference_losses_from_a_model_are_its_mean_nll_per_domain(model_and_mixture):
    model, mixture = model_and_mixture
    losses = reference_losses_from_model(model, mixture, batch_size=3)
    assert list(losses) == ["code", "prose"]
    for name, data in mixture.data.items():
        assert len(data.val) >= 2
        assert losses[name] == pytest.approx(mean_nll(model, data.val, None, 4), rel=1e-5)
    shape = dataclasses.replace(Shape.full(model.config), layers=(0, 2))
    few = held_out_losses(model, mixture, shape, batch_size=2, max_sequences=1)
    assert few["code"] == pytest.approx(mean_nll(model, mixture.data["code"].val[:1], shape))
    assert few["code"] != pytest.approx(losses["code"])


def test_a_planted_domain_far_above_its_reference_is_up_weighted(model_and_mixture):
    model, mixture = model_and_mixture
    mixture = DomainMixture(mixture.data, 4, seed=0, initial="uniform")
    losses = held_out_losses(model, mixture)
    reference = {"code": losses["code"] - 3.0, "prose": losses["prose"] + 0.5}  # code lags by 3 nats
    weights = mixture.update(losses, reference, batch=0)
    assert weights["code"] > 0.9 and weights["prose"] < 0.1
    rows = torch.cat([mixture.batch(i) for i in range(10)])
    code_rows = {tuple(row) for row in mixture.data["code"].train.tolist()}
    assert sum(tuple(row) in code_rows for row in rows.tolist()) > 0.8 * len(rows)
