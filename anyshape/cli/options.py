"""The options the commands share, declared once: MODEL, --shape, --json, --out, --overwrite, the
calibration and task options, and the options of training settings, made from TrainSettings'
fields (their help, least value, metavar and help panel live on the fields)."""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import _click

from anyshape.data.text import DEFAULT_TEXT_NAME
from anyshape.errors import AnyshapeError
from anyshape.train.settings import TrainSettings, about

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Hugging Face folder, .gguf file, 'smollm2-135m', or a run folder of `anyshape train`.",
        metavar="MODEL",
        show_default=False,
    ),
]
ShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--shape",
        help='Sub-network as inline JSON or a JSON file, e.g. \'{"layers": [0, 2], "hidden_size": 448}\'.',
        metavar="SHAPE",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


def out_option(help: str, metavar: str | None = None, optional: bool = False) -> Any:
    """--out PATH, with what the command writes there."""
    kind = Path | None if optional else Path
    return Annotated[kind, typer.Option("--out", help=help, metavar=metavar, show_default=not optional)]


def overwrite_option(help: str = "Replace OUT if it exists.") -> Any:
    """--overwrite, with what it replaces."""
    return Annotated[bool, typer.Option(help=help)]


OverwriteOpt = overwrite_option()
ForceOpt = Annotated[bool, typer.Option("--force", hidden=True, help="Deprecated: --overwrite.")]


def overwriting(overwrite: bool, force: bool) -> bool:
    """--overwrite, or the deprecated --force (said on stderr)."""
    if force:
        print("anyshape: --force is deprecated; use --overwrite", file=sys.stderr)
    return overwrite or force


# ---------------------------------------------------------------- calibration text

DataOpt = Annotated[
    Path | None,
    typer.Option(
        help=f'Calibration text: a .txt or .jsonl ("text" field) file. Default: {DEFAULT_TEXT_NAME}.',
        metavar="FILE",
        show_default=False,
    ),
]
NumSequencesOpt = Annotated[int, typer.Option(help="Calibration windows (sequences) to draw.", min=1)]
SequenceLengthOpt = Annotated[int, typer.Option(help="Tokens per calibration window.", min=2)]
SeedOpt = Annotated[int, typer.Option(help="Seed of the random window offsets.", min=-(2**63), max=2**64 - 1)]
BatchSizeOpt = Annotated[int, typer.Option(help="Sequences per forward pass.", min=1)]

# ---------------------------------------------------------------- lm-eval tasks (evaluate, report)

TasksOpt = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated lm-eval task names, from lm-eval or --include-path: zero-shot accuracy.",
        metavar="TASKS",
        show_default=False,
    ),
]
IncludePathOpt = Annotated[
    Path | None,
    typer.Option(help="For --tasks: a folder of task YAML files of your own.", metavar="DIR", show_default=False),
]
LimitOpt = Annotated[
    int | None,
    typer.Option(help="For --tasks: only the first N documents of each task.", min=1, metavar="N", show_default=False),
]
TaskBatchSizeOpt = Annotated[int, typer.Option(help="For --tasks: requests per forward pass.", min=1, metavar="N")]

# ---------------------------------------------------------------- training settings

_KINDS = {"str": str, "int": int, "float": float, "bool": bool}  # a field's annotation -> its option's type
_FIELDS = {field.name: field for field in dataclasses.fields(TrainSettings)}


def setting_parameter(field: dataclasses.Field, **changes: Any) -> inspect.Parameter:
    """The command parameter of a settings field: an option (or MODEL argument) with the field's
    help, least and greatest value, metavar and help panel; `changes` override those."""
    meaning = dataclasses.replace(about(field), **changes)
    default = _as_text(field.default) if meaning.parse else field.default
    kind = str if meaning.parse else _KINDS[field.type.removesuffix(" | None")]
    if meaning.argument:  # optional: --config or --resume may name it
        info, kind, default = typer.Argument(help=meaning.help, metavar=meaning.metavar, show_default=False), kind, None
    else:
        info = typer.Option(
            help=meaning.help, min=meaning.min, max=meaning.max, metavar=meaning.metavar, rich_help_panel=meaning.panel
        )
    kind = kind | None if default is None else kind
    return inspect.Parameter(
        field.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info]
    )


def train_option(name: str, note: str | None = None, **changes: Any) -> Any:
    """The option of TrainSettings field `name` for another command (prune, share): `note`
    appended to its help (e.g. where that command's default differs), or `changes` to it."""
    field = _FIELDS[name]
    if note is not None:
        changes["help"] = f"{changes.get('help', about(field).help)} {note}"
    return setting_parameter(field, **changes).annotation


AlignOpt = train_option("align")


def settings_command(command: Callable[..., Any]) -> Callable[..., Any]:
    """`command` with an option for every TrainSettings field (the MODEL argument for `model`),
    in the fields' order: after its positional parameters, before its keyword-only ones; the
    values arrive in its **settings."""
    own = list(inspect.signature(command, eval_str=True).parameters.values())
    generated = [setting_parameter(field) for field in _FIELDS.values() if about(field).option]
    first = [p for p in own if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
    last = [p for p in own if p.kind == inspect.Parameter.KEYWORD_ONLY]
    command.__signature__ = inspect.Signature([*first, *generated, *last])
    return command


def given_settings(ctx: typer.Context) -> dict[str, Any]:
    """The settings given on the command line (not defaults), structured values parsed."""
    given = {}
    for name, value in ctx.params.items():
        if name in _FIELDS and ctx.get_parameter_source(name) == _click.core.ParameterSource.COMMANDLINE:
            parse = about(_FIELDS[name]).parse
            try:
                given[name] = parse(value) if parse is not None else value
            except AnyshapeError as error:
                raise typer.BadParameter(str(error), param_hint=f"--{name.replace('_', '-')}") from None
    return given


def _as_text(default: Any) -> str | None:
    """A structured default as its option's text: (0.25, 0.5) -> '0.25,0.5'; () -> None."""
    return ",".join(f"{value:g}" for value in default) if default else None
