"""The `anyshape` command: a thin layer over the library that parses, prints and saves."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import click
import typer

from anyshape.errors import AnyshapeError

app = typer.Typer(
    name="anyshape",
    help="Turn one pretrained Llama-family LLM into a family of smaller, standard LLMs.\n\n"
    "MODEL is a Hugging Face folder (safetensors), a .gguf file, or the embedded default "
    "'smollm2-135m'. SHAPE is inline JSON or a JSON file with Hugging Face config field names "
    "plus 'layers' (kept layer indices); omitted widths stay the parent's.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

ModelArg = Annotated[
    str, typer.Argument(help="Hugging Face folder, .gguf file, or 'smollm2-135m'.", show_default=False)
]
ShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--shape",
        help='Sub-network as inline JSON or a JSON file, e.g. \'{"layers": [0, 2], "hidden_size": 448}\'.',
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]


def emit(record: dict[str, Any], as_json: bool) -> None:
    """Prints a result as JSON, or as aligned `key: value` lines."""
    if as_json:
        print(json.dumps(record, indent=2))
        return
    width = max(map(len, record))
    for key, value in record.items():
        print(f"{key:<{width}}  {json.dumps(value) if isinstance(value, dict | list) else value}")


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (2 for bad input, with a one-line message)."""
    from anyshape.cli import evaluate, extract, info  # noqa: F401  (registers the commands)

    try:
        app(args=argv, prog_name="anyshape", standalone_mode=False)
    except AnyshapeError as error:
        print(f"anyshape: error: {error}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except click.ClickException as error:  # bad arguments: exit status 2
        print(f"anyshape: error: {error.format_message()} (see anyshape --help)", file=sys.stderr)
        return error.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("anyshape: interrupted; nothing partial was left behind", file=sys.stderr)
        return 130
    return 0
