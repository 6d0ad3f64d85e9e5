"""`anyshape report` on a tiny family: every number in the report is the one its own tool gives
for that model (parameter counts, file sizes, perplexity, task accuracy), the markdown, JSON and
PNG are written whole or not at all, and bad input exits 2 with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import anyshape
from anyshape import Shape, export_hf
from anyshape.cli import report as report_command
from anyshape.compress.stages import StageCache
from anyshape.deploy import report as report_module
from anyshape.deploy.report import ReportSettings, family_report, markdown_report, write_family_report
from anyshape.deploy.speed import SpeedSettings
from anyshape.evaluate.harness import evaluate_tasks
from anyshape.evaluate.perplexity import perplexity, tokenize
from anyshape.importance.permute import sort_
from anyshape.importance.scores import score
from tests.conftest import assert_png, byte_tokenizer
from tests.unit.test_cli import assert_bad_input, run, text_file
from tests.unit.test_harness import CHOICE, DOCS, TASK_YAML

PARENT = "llama3-gqa"  # 4 layers, hidden 64, 8 query heads in 2 KV groups, MLP 96, untied
MEMBERS = {  # folder -> Shape of the parent
    "0.4": {"layers": [0, 3], "hidden_size": 48, "num_attention_heads": 4, "intermediate_size": 64},
    "0.7": {"num_hidden_layers": 3, "num_key_value_heads": 1, "num_attention_heads": 4},
}
TASK = "tiny_choice"
SPEED = SpeedSettings(prompt_tokens=8, gen_tokens=4, repeats=2, warmup=0)
FAST = ["--prompt-tokens", 8, "--gen-tokens", 4, "--repeats", 2]


@pytest.fixture(scope="module")
def family(tiny_dir, tmp_path_factory) -> Path:
    """A family folder as `anyshape compress` writes it: member folders and summary.json."""
    folder = tmp_path_factory.mktemp("family")
    parent = anyshape.load(tiny_dir(PARENT))
    members = []
    for name, fields in MEMBERS.items():
        shape = Shape.from_dict(fields, parent.config)
        export_hf(parent, shape, folder / name, tokenizer=byte_tokenizer(), parent=str(tiny_dir(PARENT)))
        members.append({"folder": name, "shape": shape.to_dict()})
    summary = {"model": str(tiny_dir(PARENT)), "members": members}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """A folder with one 3-question multiple-choice task, `tiny_choice`."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "tiny.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS[:3]))
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(name=TASK, data_file="tiny.jsonl") + CHOICE)
    return folder


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return text_file(tmp_path_factory.mktemp("text"))


def as_json(report) -> dict:
    """The report's dict as JSON gives it back (tuples become lists)."""
    return json.loads(json.dumps(report.to_dict()))


@pytest.fixture(scope="module")
def measured(family, tasks, text):
    settings = ReportSettings(tasks=(TASK,), include_path=str(tasks), data=str(text), speed=SPEED)
    return family_report(family, settings)


def test_every_number_is_what_its_own_tool_gives(measured, family, tasks, text, tiny_dir):
    parent = anyshape.load(tiny_dir(PARENT))
    assert [(m.name, m.role) for m in measured.models] == [("parent", "parent"), ("0.4", "member"), ("0.7", "member")]
    references = [tiny_dir(PARENT), family / "0.4", family / "0.7"]
    shapes = [parent.full_shape] + [Shape.from_dict(fields, parent.config) for fields in MEMBERS.values()]
    for row, folder, shape in zip(measured.models, references, shapes, strict=True):
        assert row.num_parameters == shape.num_parameters(parent.config)
        assert row.num_parameters_non_embedding == shape.num_parameters(parent.config, embeddings=False)
        assert row.weight_files == ["model.safetensors"]
        assert row.file_bytes == (folder / "model.safetensors").stat().st_size
        model, tokenizer = anyshape.load(folder), anyshape.load_tokenizer(folder)
        assert row.perplexity == perplexity(model, tokenize(tokenizer, text.read_text()))
        expected = evaluate_tasks(model, tokenizer, None, [TASK], tasks)
        assert row.tasks == expected.scores and row.samples == {TASK: 3}
        assert {s.metric for s in row.tasks} == {"acc", "acc_norm"}
        [speed] = row.speed
        assert speed.runtime == "anyshape" and speed.model == row.name
        assert 0 < speed.prefill.min <= speed.prefill.max and 0 < speed.decode.min <= speed.decode.max
    assert len({row.perplexity.perplexity for row in measured.models}) == 3, "each row measures its own model"


def test_a_trained_family_has_a_row_for_each_members_zero_shot_shape(family, tasks, text, tiny_dir, tmp_path):
    trained = tmp_path / "family"
    shutil.copytree(family, trained)
    parent = anyshape.load(tiny_dir(PARENT))
    scores = score(
        parent, torch.randint(0, parent.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    )
    scores.save(StageCache(trained / "stages").path("scores", ".safetensors"))
    zero_shot = Shape.from_dict({"num_hidden_layers": 2, "intermediate_size": 48}, parent.config)
    summary = json.loads((trained / "summary.json").read_text())
    summary["members"][1]["zero_shot"] = {"shape": zero_shot.to_dict(), "ppl": 1.0}
    (trained / "summary.json").write_text(json.dumps(summary))
    settings = ReportSettings(tasks=(TASK,), include_path=str(tasks), data=str(text), speed=SPEED)
    report = family_report(trained, settings)
    assert [(m.name, m.role) for m in report.models] == [
        ("parent", "parent"), ("0.4", "member"), ("0.7", "member"), ("0.7 zero-shot", "zero-shot")
    ]  # fmt: skip
    row = report.models[3]
    tokenizer = anyshape.load_tokenizer(tiny_dir(PARENT))
    ids = tokenize(tokenizer, text.read_text())
    unsorted = perplexity(parent, ids, zero_shot)
    sort_(parent, scores)  # the zero-shot Shape slices the parent sorted as the family was
    assert row.perplexity == perplexity(parent, ids, zero_shot) != unsorted
    assert row.tasks == evaluate_tasks(parent, tokenizer, zero_shot, [TASK], tasks).scores
    assert row.num_parameters == zero_shot.num_parameters(parent.config) and row.weight_files == []
    table = markdown_report(report, "r.png")
    assert "| 0.7 zero-shot | L2 " in table and "Zero-shot rows" in table


def test_files_are_written_whole_or_not_at_all(measured, tmp_path, monkeypatch):
    paths = write_family_report(measured, tmp_path / "r.md")
    assert [p.name for p in paths] == ["r.md", "r.json", "r.png"]
    assert json.loads(paths[1].read_text()) == as_json(measured)
    assert_png(paths[2])
    with pytest.raises(anyshape.AnyshapeError, match="already exists"):
        write_family_report(measured, tmp_path / "r.md")

    def broken_plot(report, path):
        Path(path).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "plot_family_report", broken_plot)
    with pytest.raises(KeyboardInterrupt):
        write_family_report(measured, tmp_path / "other.md")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md", "r.png"]


def test_command_writes_one_table_json_and_plot(capsys, family, tasks, text, measured, monkeypatch):
    asked = []

    def measured_report(folder, settings, progress):  # the measurements, tested above
        asked.append((folder, settings))
        return measured

    monkeypatch.setattr(report_command, "family_report", measured_report)
    args = ["report", family, "--tasks", TASK, "--include-path", tasks, "--data", text, *FAST]
    status, out, err = run(capsys, *args, "--runtimes", "anyshape,transformers", "--json")
    assert status == 0, err
    speed = SpeedSettings(prompt_tokens=8, gen_tokens=4, repeats=2)
    settings = ReportSettings((TASK,), str(tasks), data=str(text), speed=speed, runtimes=("anyshape", "transformers"))
    assert asked == [(family, settings)]
    record = json.loads(out)
    assert record == json.loads((family / "deploy-report.json").read_text()) == as_json(measured)
    assert_png(family / "deploy-report.png")
    table = [line for line in (family / "deploy-report.md").read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == [
        "model", "Shape", "parameters", "non-embedding", "file MB", "bytes/param", "perplexity",
        f"{TASK} acc", f"{TASK} acc_norm", "prefill tok/s (anyshape)", "decode tok/s (anyshape)",
        "peak MiB (anyshape)",
    ]  # fmt: skip
    assert len(table) == 2 + 3 and len({line.count("|") for line in table}) == 1
    for line, model in zip(table[2:], record["models"], strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[2] == f"{model['num_parameters']:,}"
        assert cells[4] == f"{model['file_bytes'] / 1e6:.1f}"
        assert cells[6] == f"{model['perplexity']['perplexity']:.2f}"
        acc = model["tasks"][0]
        assert cells[7] == f"{acc['value']:.3f} ± {acc['stderr']:.3f}"
        assert cells[10] == f"{model['speed'][0]['decode']['median']:.1f}"

    monkeypatch.undo()  # from here on, real measurements
    status, _, err = run(capsys, "report", family, "--data", text, "--no-speed")
    assert status == 2 and "deploy-report.md already exists" in err and "--overwrite" in err
    status, out, err = run(capsys, "report", family, "--data", text, "--no-speed", "--overwrite")
    assert status == 0, err
    assert out.splitlines()[0].endswith("| perplexity |"), "no tasks and no speed: no such columns"
    record = json.loads((family / "deploy-report.json").read_text())
    assert record["settings"]["speed"] is None
    assert [m["perplexity"] for m in record["models"]] == [m.perplexity.to_dict() for m in measured.models]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["EMPTY"], ["not a family folder", "summary.json", "anyshape compress"]),
        (["PARENT"], ["is a model folder", "anyshape compress"]),
        (["NO_PARENT"], ["cannot find the family's parent", "not found"]),
        (["FAMILY", "--tasks", "tiny_choise", "--include-path", "TASKS"], ["unknown task", "tiny_choice"]),
        (["FAMILY", "--limit", "5"], ["--limit", "needs task names"]),
        (["FAMILY", "--runtimes", "anyshape,vllm"], ["--runtimes", "llama.cpp"]),
        (["FAMILY", "--out", "report.txt"], ["--out", ".md"]),
    ],
)
def test_bad_input_exits_2(capsys, family, tasks, tiny_dir, tmp_path, args, words):
    (tmp_path / "empty").mkdir()
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "summary.json").write_text(json.dumps({"model": str(tmp_path / "gone"), "members": [{"folder": "a"}]}))
    replace = {"EMPTY": tmp_path / "empty", "PARENT": tiny_dir(PARENT), "NO_PARENT": orphan, "FAMILY": family}
    replace["TASKS"] = tasks
    out = ["--out", tmp_path / "r.md"] if "--out" not in args else []
    assert_bad_input(capsys, ["report", *[replace.get(arg, arg) for arg in args], "--no-speed", *out], *words)


def test_help_teaches_what_is_measured(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # narrow: the example line must still not wrap
    status, out, err = run(capsys, "report", "--help")
    assert status == 0 and err == ""
    assert out.startswith("Usage: anyshape report [OPTIONS] {FAMILY}")
    assert "\n  Example: anyshape report family/ --tasks hellaswag_local --include-path tasks/ --limit 200\n" in out
    for option in (
        "--tasks",
        "--include-path",
        "--limit",
        "--data",
        "--runtimes",
        "--no-speed",
        "--out",
        "--overwrite",
    ):
        assert option in out
