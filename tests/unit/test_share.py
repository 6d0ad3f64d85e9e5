"""Adjacent-layer sharing (SHARP) on tiny models: plans, recovery, warm-up, compact storage,
stage 2 on the training loop, and `anyshape share` end to end."""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyshape
from anyshape import Shape
from anyshape.errors import AnyshapeError
from anyshape.model.adapters import merged
from anyshape.share.pipeline import ShareSettings, share
from anyshape.share.plan import SharingPlan, build_plan
from anyshape.share.recovery import ScaledLowRank
from anyshape.share.storage import WEIGHTS, save_shared
from anyshape.share.tie import projection, share_weights
from anyshape.share.warmup import record_layers, warm_up
from anyshape.train.settings import TrainSettings
from tests.conftest import byte_tokenizer
from tests.unit.test_cli import assert_bad_input, run
from tests.unit.test_train import assert_same_state, free_port, train_interrupted_and_resumed

PARENT = "llama3-gqa"  # 4 layers, hidden 64, 8 query heads in 2 KV groups, MLP 96, untied
SMALL = Shape(layers=(0, 2, 3), hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
INPUT_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
TWO = SharingPlan(((2, 1), (3, 1)), ("mlp", "attention"), "lowrank", 4)  # layers 2 and 3 read layer 1


@pytest.fixture
def text(tmp_path, monkeypatch):
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "train.txt"
    path.write_text(" ".join(f"Sentence {i} says that {i % 7} plus {i % 5} is {i % 7 + i % 5}." for i in range(300)))
    return path


def logits(model, shape=None) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS, shape)


def randomise_recovery(parameters: list[torch.nn.Parameter]) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(torch.randn_like(parameter) * 0.1)


def test_plans_name_the_layers_they_replace():
    assert build_plan("next-interval", 30, start=10).pairs == tuple((i, i - 1) for i in range(11, 30, 2))
    assert build_plan("next-interval", 30, start=3, group=3, count=4).pairs == ((4, 3), (5, 3), (7, 6), (8, 6))
    assert build_plan("consecutive", 30, start=20, count=3).pairs == ((21, 20), (22, 20), (23, 20))
    plan = build_plan("explicit", 30, pairs="11:10,13:12", components="both", recovery="scaled", rank=8)
    assert plan.pairs == ((11, 10), (13, 12)) and plan.projections[0] == "gate_proj" and len(plan.projections) == 7
    assert SharingPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (["--replace", "explicit", "--pairs", "0:1"], ["layer 0 cannot be replaced"]),
        (["--replace", "explicit", "--pairs", "2:2"], ["2:2", "with itself"]),
        (["--replace", "explicit", "--pairs", "4:3"], ["4:3", "out of range", "0..3"]),
        (["--replace", "explicit", "--pairs", "2:1,3:2"], ["3:2", "itself replaced"]),
        (["--replace", "explicit", "--pairs", "2-1"], ["2-1", "layer:reference"]),
        (["--replace", "explicit"], ["--pairs"]),
        (["--start-layer", "7"], ["--start-layer 7", "out of range"]),
        (["--replace", "consecutive", "--start-layer", "1", "--count", "3"], ["4:1", "out of range"]),
        (["--replace", "sideways", "--start-layer", "1"], ["sideways", "next-interval"]),
        (["--start-layer", "1", "--components", "ffn"], ["ffn", "mlp, attention, both"]),
        (["--start-layer", "1", "--precision", "fp8"], ["precision 'fp8'", "auto, fp32, bf16"]),
    ],
)
def test_bad_plans_exit_with_status_2_and_say_why(capsys, tiny_dir, tmp_path, options, words):
    assert_bad_input(capsys, ["share", tiny_dir(PARENT), "--out", tmp_path / "out", *options], *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recovery", ["lowrank", "scaled"])
def test_sharing_identical_weights_equals_the_plain_model(tiny_dir, recovery):
    plain = anyshape.load(tiny_dir(PARENT))
    with torch.no_grad():  # layers 2 and 3 get layer 1's projections: sharing them changes nothing
        for layer, reference in TWO.pairs:
            for name in TWO.projections:
                projection(plain, layer, name).weight.copy_(projection(plain, reference, name).weight)
    for rank in (0, 4):  # rank 4: the recovery's fit of identical weights is zero
        shared = copy.deepcopy(plain)
        share_weights(shared, replace(TWO, recovery=recovery, rank=rank))
        torch.testing.assert_close(logits(shared), logits(plain), atol=1e-5, rtol=1e-5)
        assert projection(shared, 3, "up_proj").weight is projection(shared, 1, "up_proj").weight
        unique = sum(p.numel() for p in shared.parameters()) - sum(p.numel() for p in plain.parameters())
        recovery_count = sum(p.numel() for p in shared.parameters() if p.requires_grad)
        assert unique == recovery_count - 2 * sum(projection(plain, 1, n).weight.numel() for n in TWO.projections)


@pytest.mark.parametrize("recovery", ["lowrank", "scaled"])
def test_recovery_follows_the_shape_and_merges_exactly(tiny_dir, recovery):
    model = anyshape.load(tiny_dir(PARENT))
    trainable = share_weights(model, replace(TWO, recovery=recovery))
    randomise_recovery(trainable)
    assert all(not p.requires_grad for p in model.model.layers[0].parameters())
    for shape in (model.full_shape, SMALL):
        torch.testing.assert_close(logits(merged(model, shape), shape), logits(model, shape), atol=1e-5, rtol=1e-5)
    assert projection(model, 2, "up_proj").weight is projection(model, 1, "up_proj").weight, "merging kept the tie"
    if recovery == "scaled":  # the per-channel scale costs one rank: never more parameters than lowrank's
        lowrank = share_weights(anyshape.load(tiny_dir(PARENT)), TWO)
        assert isinstance(projection(model, 2, "q_proj").adapter, ScaledLowRank)
        assert sum(p.numel() for p in trainable) <= sum(p.numel() for p in lowrank)


@pytest.mark.parametrize("recovery", ["lowrank", "scaled"])
def test_warm_up_beats_direct_sharing_and_its_start_on_held_out_inputs(tiny_dir, recovery):
    model = anyshape.load(tiny_dir(PARENT))
    ids = torch.randint(0, 256, (20, 16), generator=torch.Generator().manual_seed(2))
    plan = replace(TWO, recovery=recovery)
    records = record_layers(model, ids, plan.replaced)
    assert records[2][0].shape == (20, 16, 64)
    share_weights(model, plan)
    fits = warm_up(model, records, steps=60, lr=3e-3, batch_size=4, held_out=0.25)
    assert [fit.layer for fit in fits] == [2, 3]
    for fit in fits:
        assert fit.final < min(fit.initial, fit.direct), fit


def test_compact_folder_round_trips_and_stores_each_tensor_once(tiny_dir, tmp_path):
    model = anyshape.load(tiny_dir(PARENT))
    randomise_recovery(share_weights(model, TWO))
    out = save_shared(model, TWO, tmp_path / "shared", byte_tokenizer(), parent="tiny")
    loaded = anyshape.load(out)
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)
    torch.testing.assert_close(logits(loaded, SMALL), logits(model, SMALL), atol=0, rtol=0)
    for name in TWO.projections:
        assert projection(loaded, 3, name).weight is projection(loaded, 1, name).weight
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]
    with open(out / WEIGHTS, "rb") as file:  # the data after the header: each float32 tensor once
        data_bytes = (out / WEIGHTS).stat().st_size - 8 - int.from_bytes(file.read(8), "little")
    replaced = 2 * sum(projection(model, 1, name).weight.numel() for name in TWO.projections)
    recovery = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert data_bytes == 4 * (model.full_shape.num_parameters(model.config) - replaced + recovery)


def test_merged_export_reloads_in_transformers_with_the_compact_models_logits(tiny_dir, tmp_path):
    model = anyshape.load(tiny_dir(PARENT))
    randomise_recovery(share_weights(model, replace(TWO, recovery="scaled")))
    compact = anyshape.load(save_shared(model, replace(TWO, recovery="scaled"), tmp_path / "shared"))
    for shape, name in ((compact.full_shape, "plain"), (SMALL, "small")):
        anyshape.export_hf(compact, shape, tmp_path / name)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(INPUT_IDS).logits, logits(compact, shape), atol=1e-5, rtol=1e-5)


def run_stage_two(tiny_dir, text, tmp_path, all_weights: bool):
    """Stage 2 of TWO on the tiny parent, interrupted and resumed (checked equal to an
    uninterrupted run): the compact folder it started from, the run, and the resumed model."""
    model = anyshape.load(tiny_dir(PARENT))
    share_weights(model, TWO)
    compact = save_shared(model, TWO, tmp_path / "shared", byte_tokenizer())
    settings = TrainSettings(
        model=str(compact), data=str(text), out=str(tmp_path / "run"), fractions=(1.0,), random_shapes=0,
        kd="none", adapter="full", all_weights=all_weights, steps=4, seq_len=32, batch_size=4, lr=1e-2,
        save_every=2, eval_every=4,
    )  # fmt: skip
    reference = train_interrupted_and_resumed(settings, 2)
    resumed = anyshape.load(settings.out)
    assert_same_state(resumed, anyshape.load(reference.out))
    assert projection(resumed, 2, "down_proj").weight is projection(resumed, 1, "down_proj").weight
    return compact, Path(settings.out), resumed


def changed_tensors(model, before) -> set[str]:
    pairs = zip(model.state_dict().items(), before.state_dict().items(), strict=True)
    return {name for (name, a), (_, b) in pairs if not torch.equal(a, b)}


def test_stage_two_trains_only_the_recovery_and_resumes_exactly(tiny_dir, text, tmp_path):
    compact, run, resumed = run_stage_two(tiny_dir, text, tmp_path, all_weights=False)
    from safetensors.torch import load_file

    saved = load_file(run / "checkpoint" / "weights.safetensors")
    assert saved and all(".adapter." in name for name in saved), sorted(saved)[:3]
    recovery = {name for name in resumed.state_dict() if ".adapter." in name}
    assert changed_tensors(resumed, anyshape.load(compact)) == recovery, "only the recovery may change"


def test_stage_two_can_train_every_weight_and_still_stores_each_shared_tensor_once(tiny_dir, text, tmp_path):
    compact, _, resumed = run_stage_two(tiny_dir, text, tmp_path, all_weights=True)
    changed = changed_tensors(resumed, anyshape.load(compact))
    assert {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.adapter.lora_A"} <= changed
    tuned = anyshape.load(save_shared(resumed, TWO, tmp_path / "tuned"))
    torch.testing.assert_close(logits(tuned), logits(resumed), atol=0, rtol=0)
    assert (tmp_path / "tuned" / WEIGHTS).stat().st_size == (compact / WEIGHTS).stat().st_size


def test_an_adapter_that_would_replace_the_recovery_is_refused(capsys, tiny_dir, text, tmp_path):
    model = anyshape.load(tiny_dir(PARENT))
    share_weights(model, TWO)
    compact = save_shared(model, TWO, tmp_path / "shared", byte_tokenizer())
    args = ["train", compact, "--data", text, "--adapter", "lora", "--steps", "1", "--out", tmp_path / "run"]
    assert_bad_input(capsys, args, "already has adapters", "--adapter full")
    with pytest.raises(AnyshapeError, match="--adapter full"):
        TrainSettings(adapter="lora", all_weights=True).check()


def test_share_command_writes_a_model_that_every_command_reads(capsys, tiny_dir, text, tmp_path, monkeypatch):
    import anyshape.share.pipeline as pipeline

    out = tmp_path / "shared"
    args = ["share", tiny_dir(PARENT), "--replace", "consecutive", "--start-layer", "1", "--count", "2",
            "--components", "both", "--rank", "4", "--data", text, "--warmup-steps", "4", "--warmup-sequences", "4",
            "--finetune-steps", "4", "--finetune-weights", "--save-every", "2", "--seq-len", "32", "--lr", "1e-2",
            "--out", out]  # fmt: skip
    original_train = pipeline.train

    def interrupted_train(*positional, **options):
        def stop(step: int) -> None:
            if step == 2:
                raise KeyboardInterrupt

        return original_train(*positional, **options, on_step=stop)

    monkeypatch.setattr(pipeline, "train", interrupted_train)
    assert run(capsys, *args)[0] == 130  # Ctrl-C in stage 2: the working folder stays, OUT is not written
    assert not out.exists() and (tmp_path / "shared.work" / "run" / "checkpoint").is_dir()
    monkeypatch.setattr(pipeline, "train", original_train)
    assert_bad_input(capsys, args, "interrupted share", "--resume")
    status, stdout, err = run(capsys, *args, "--resume", "--json")
    assert status == 0, err
    record = json.loads(stdout)
    assert record["replaced_layers"] == [2, 3] and not (tmp_path / "shared.work").exists()
    assert record["warmup_error_after"] < record["warmup_error_direct"]

    status, stdout, err = run(capsys, "info", out, "--json")
    assert status == 0, err
    info = json.loads(stdout)
    assert info["effective_parameters"] == info["num_parameters"] > info["stored_parameters"]
    assert info["stored_bytes"] == (out / WEIGHTS).stat().st_size < info["plain_bytes"]
    assert info["sharing"]["pairs"] == "2:1 3:1"
    shared, parent = anyshape.load(out), anyshape.load(tiny_dir(PARENT))
    assert not torch.equal(projection(shared, 1, "up_proj").weight, projection(parent, 1, "up_proj").weight)
    status, stdout, err = run(capsys, "evaluate", out, "--ppl", "--data", text, "--json")
    assert status == 0, err
    status, _, err = run(capsys, "extract", out, "--merge", "--out", tmp_path / "plain")
    assert status == 0, err
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, logits(anyshape.load(out)), atol=1e-5, rtol=1e-5)


def _share_as_rank(rank: int, world_size: int, port: int, settings: ShareSettings) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )  # fmt: skip
    torch.set_num_threads(1)
    share(settings)


@pytest.mark.integration
def test_two_processes_share_like_one(tiny_dir, text, tmp_path):
    settings = ShareSettings(
        model=str(tiny_dir(PARENT)), plan=TWO, out=str(tmp_path / "two"), data=str(text), seq_len=32,
        warmup_steps=5, warmup_sequences=8, finetune_steps=2, batch_size=4, lr=1e-2,
    )  # fmt: skip
    share(replace(settings, out=str(tmp_path / "one")))
    torch.multiprocessing.spawn(_share_as_rank, args=(2, free_port(), settings), nprocs=2)
    two, one = anyshape.load(tmp_path / "two"), anyshape.load(tmp_path / "one")
    for (name, a), (_, b) in zip(two.state_dict().items(), one.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert not (tmp_path / "two.work").exists()


def test_share_help_teaches(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    status, out, err = run(capsys, "share", "--help")
    assert status == 0 and err == ""
    assert "\n    anyshape share smollm2-135m --replace consecutive --start-layer 20 --count 4 --out shared/\n" in out
    for option in ("--replace", "--start-layer", "--pairs", "--components", "--recovery", "--rank", "--resume"):
        assert option in out


def test_rank_above_a_projections_size_is_refused(tiny_dir):
    with pytest.raises(AnyshapeError, match="rank 100 exceeds"):
        share_weights(anyshape.load(tiny_dir(PARENT)), replace(TWO, rank=100))
