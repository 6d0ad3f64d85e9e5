"""The importance commands end to end on a tiny model: importance -> sort -> layers, and rpd."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from anyshape.cli import main

TEXT = " ".join(f"sentence {i} says something about pruning unit {i % 7}." for i in range(400))


@pytest.fixture()
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_importance_sort_layers(tiny_dir, tmp_path, calib, capsys):
    model = tiny_dir("llama3-gqa")
    scores = tmp_path / "scores.safetensors"
    status, out, err = run(
        capsys,
        "importance",
        model,
        "--data",
        calib,
        "--out",
        scores,
        "--metric",
        "taylor",
        "--layer-metric",
        "drop",
        "--num-sequences",
        4,
        "--sequence-length",
        32,
        "--json",
    )
    assert status == 0, err
    assert json.loads(out)["metric"] == "taylor" and scores.is_file()

    sorted_dir = tmp_path / "sorted"
    status, out, err = run(capsys, "sort", model, "--scores", scores, "--out", sorted_dir, "--json")
    assert status == 0, err
    probe = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(model)(probe).logits
        permuted = AutoModelForCausalLM.from_pretrained(sorted_dir)(probe).logits
    torch.testing.assert_close(permuted, original, atol=1e-5, rtol=0)
    assert json.loads((sorted_dir / "anyshape.json").read_text())["sorted_by"]["metric"] == "taylor"

    status, out, err = run(
        capsys,
        "layers",
        sorted_dir,
        "--method",
        "dp",
        "--keep",
        2,
        "--data",
        calib,
        "--num-sequences",
        2,
        "--sequence-length",
        32,
        "--json",
    )
    assert status == 0, err
    [depth] = json.loads(out)["depths"]
    assert depth["keep"] == 2 and len(depth["layers"]) == 2

    status, out, err = run(
        capsys,
        "layers",
        sorted_dir,
        "--method",
        "bi",
        "--scores",
        sorted_dir / "importance.safetensors",
        "--data",
        calib,
        "--sequence-length",
        32,
    )
    assert status == 0, err


def test_rpd_table(tiny_dir, calib, capsys):
    status, out, err = run(
        capsys,
        "rpd",
        tiny_dir("qwen2-gqa"),
        "--data",
        calib,
        "--samples",
        3,
        "--schemes",
        "magnitude,activation:norm:mean",
        "--num-sequences",
        2,
        "--sequence-length",
        32,
        "--eval-sequences",
        2,
        "--json",
    )
    assert status == 0, err
    assert [s["scheme"] for s in json.loads(out)["schemes"]] == ["magnitude", "activation:norm:mean"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["importance", "{model}", "--out", "{tmp}/s.safetensors", "--metric", "l1", "--data", "{calib}"],
            "unknown metric 'l1'",
        ),
        (
            [
                "importance",
                "{model}",
                "--out",
                "{tmp}/s.safetensors",
                "--agg-seq",
                "max",
                "--data",
                "{calib}",
            ],
            "unknown sequence aggregation 'max'",
        ),
        (["sort", "{model}", "--scores", "{other_scores}", "--out", "{tmp}/sorted"], "do not fit the model"),
        (["sort", "{model}", "--scores", "{calib}", "--out", "{tmp}/sorted"], "not a readable scores file"),
        (["layers", "{model}", "--keep", "9", "--data", "{calib}"], "keep=9 is out of range"),
        (["layers", "{model}", "--method", "greedy", "--data", "{calib}"], "unknown depth-selection method"),
        (
            ["rpd", "{model}", "--schemes", "activation:max:mean", "--data", "{calib}"],
            "unknown aggregation 'max'",
        ),
        (
            [
                "importance",
                "{model}",
                "--out",
                "{tmp}/s.safetensors",
                "--sequence-length",
                "100000",
                "--data",
                "{calib}",
            ],
            "fewer than one sequence",
        ),
    ],
)
def test_bad_input_exits_2_with_one_line(tiny_dir, tmp_path, calib, capsys, argv, message):
    other_scores = tmp_path / "other.safetensors"
    if "{other_scores}" in argv:
        main(
            [
                "importance",
                str(tiny_dir("qwen2-gqa")),
                "--out",
                str(other_scores),
                "--data",
                str(calib),
                "--num-sequences",
                "2",
                "--sequence-length",
                "16",
            ]
        )
        capsys.readouterr()
    values = {"model": tiny_dir("llama3-gqa"), "tmp": tmp_path, "calib": calib, "other_scores": other_scores}
    status, _, err = run(capsys, *(a.format(**values) for a in argv))
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
