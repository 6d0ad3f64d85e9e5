"""The options of training settings come from TrainSettings' fields; the command line overrides a
config file and a resumed run; --overwrite everywhere, --force still read (deprecated)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import typer

from anyshape.cli import app
from anyshape.train.settings import TrainSettings, about
from tests.unit.test_cli import PARENT, assert_bad_input, run

FIELDS = dataclasses.fields(TrainSettings)
FORCE_DEPRECATED = "anyshape: --force is deprecated; use --overwrite"


def command_params(name: str) -> dict:
    command = typer.main.get_command(app).commands[name]
    return {param.name: param for param in command.params}


def test_every_setting_is_an_option_of_train_with_its_help():
    params = command_params("train")
    without_option = {field.name for field in FIELDS if not about(field).option}
    assert without_option == {"prune_target"}, "a setting without an option must be a deliberate exception"
    for field in FIELDS:
        meaning = about(field)
        assert meaning.help.strip(), f"{field.name} has no help text"
        if field.name in without_option:
            assert field.name not in params
            continue
        param = params[field.name]
        assert param.help == meaning.help, field.name
        if meaning.argument:
            assert param.param_type_name == "argument" and param.metavar == meaning.metavar
            continue
        assert param.opts[0] == "--" + field.name.replace("_", "-")
        assert (param.min, param.max, param.rich_help_panel) == (meaning.min, meaning.max, meaning.panel), field.name
        assert param.metavar == meaning.metavar, field.name
        if meaning.parse is None:
            assert param.default == field.default, field.name


def test_help_lists_every_setting(capsys):
    status, out, _ = run(capsys, "train", "--help")
    assert status == 0
    for field in FIELDS:
        if about(field).option and not about(field).argument:
            assert "--" + field.name.replace("_", "-") in out


@pytest.mark.parametrize(
    ("command", "name", "field"),
    [("prune", "seq_len", "seq_len"), ("prune", "domains", "domains"), ("share", "max_memory", "max_memory")],
)
def test_prune_and_share_take_the_settings_help(command, name, field):
    assert command_params(command)[name].help == about(TrainSettings.__dataclass_fields__[field]).help


@pytest.fixture
def trained(monkeypatch) -> list[TrainSettings]:
    """The settings `anyshape train` would train with (training replaced by recording them)."""
    calls: list[TrainSettings] = []

    def record(settings, **kwargs):
        calls.append(settings)
        return {"step": settings.steps, "loss": None, "val_ppl": None}

    monkeypatch.setattr("anyshape.train.loop.train", record)
    return calls


def test_command_line_overrides_the_config_file(capsys, tmp_path, trained):
    config = tmp_path / "elastic.yaml"
    config.write_text("steps: 3\nseq_len: 32\nkd: js\nfractions: [0.5, 1]\nrouter: true\n")
    args = ["train", "--config", config, "--steps", "5", "--fractions", "0.25,1", "--no-router", "--out", tmp_path]
    status, _, err = run(capsys, *args)
    assert status == 0, err
    settings = trained[-1]
    assert (settings.steps, settings.fractions, settings.router) == (5, (0.25, 1.0), False)  # given: they win
    assert (settings.seq_len, settings.kd) == (32, "js")  # not given: the file's, not the options' defaults
    assert settings.batch_size == TrainSettings().batch_size  # in neither: the default


def test_command_line_overrides_a_resumed_run(capsys, tmp_path, trained):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorded = TrainSettings(steps=4, kd="l2", save_every=2, out=str(run_dir))
    (run_dir / "train.json").write_text(json.dumps({"settings": recorded.to_dict()}))
    config = tmp_path / "more.yaml"
    config.write_text("save_every: 3\nkd: js\n")
    status, _, err = run(capsys, "train", "--resume", run_dir, "--config", config, "--kd", "cosine", "--out", "x")
    assert status == 0, err
    settings = trained[-1]
    assert (settings.kd, settings.save_every, settings.steps) == ("cosine", 3, 4)
    assert settings.out == str(run_dir)  # a resumed run stays in its folder


def test_structured_options_are_parsed_and_named_when_bad(capsys, tmp_path, trained):
    status, _, err = run(capsys, "train", "--sampling", "fixed", "--shapes", '{"hidden_size": 32}', "--out", tmp_path)
    assert status == 0, err
    assert trained[-1].shapes == ({"hidden_size": 32},)
    assert_bad_input(capsys, ["train", "--anchors", "0.5"], "--anchors", "at least two")
    assert_bad_input(capsys, ["train", "--fractions", "0,2"], "--fractions", "(0, 1]")


def test_export_force_is_a_deprecated_overwrite(capsys, tiny_dir, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    args = ["export", tiny_dir(PARENT), "--format", "hf", "--outtype", "f32", "--out", out]
    assert_bad_input(capsys, args, "already exists", "--overwrite")
    status, _, err = run(capsys, *args, "--force")
    assert status == 0, err
    assert err.splitlines().count(FORCE_DEPRECATED) == 1
    assert (out / "model.safetensors").is_file()
    status, _, err = run(capsys, *args, "--overwrite")
    assert status == 0 and FORCE_DEPRECATED not in err


def test_report_force_is_a_deprecated_overwrite(capsys, tmp_path):
    report = tmp_path / "report.md"
    report.write_text("mine")
    args = ["report", tmp_path / "no-family", "--no-speed", "--out", report]
    assert_bad_input(capsys, args, "already exists", "--overwrite")
    status, _, err = run(capsys, *args, "--force")
    assert status == 2  # past the existing report: the next check refuses the family
    assert err.splitlines()[0] == FORCE_DEPRECATED and "already exists" not in err
    assert "--force" not in run(capsys, "report", "--help")[1]
