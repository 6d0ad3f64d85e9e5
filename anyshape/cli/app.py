"""The `anyshape` command: a thin layer over the library that parses, prints and saves."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from anyshape.errors import AnyshapeError

app = typer.Typer(
    name="anyshape",
    help="Turn one pretrained Llama-family LLM into a family of smaller, standard LLMs.\n\n"
    "MODEL is a Hugging Face folder (safetensors), a .gguf file, the embedded default "
    "'smollm2-135m', or a run folder of `anyshape train`. SHAPE is inline JSON or a JSON file "
    "with Hugging Face config field names plus 'layers' (kept layer indices); omitted widths "
    "stay the parent's.\n\n"
    "\b\nExamples:\n"
    "  anyshape info smollm2-135m --json\n"
    "  anyshape extract smollm2-135m --shape '{\"num_hidden_layers\": 20}' --out out/small\n"
    "  anyshape evaluate out/small --ppl --json",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

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
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        help="Refuse to start training when the estimated peak memory of a step exceeds this (e.g. 8GiB); "
        "default: what the loaded model holds plus what is free.",
        metavar="SIZE",
        show_default=False,
    ),
]


@app.callback()
def _global_options(
    ctx: typer.Context,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Read pickle weights (pytorch_model.bin, .pt) with torch.load(weights_only=True), which are "
            "refused otherwise. For trusted files only: a pickle can run code. Give it before the command.",
        ),
    ] = False,
) -> None:
    if allow_pickle:
        from anyshape.model.load import allowing_pickle

        ctx.with_resource(allowing_pickle())


def emit(record: dict[str, Any], as_json: bool) -> None:
    """Prints a result as JSON, or as aligned `key: value` lines."""
    if as_json:
        print(json.dumps(record, indent=2))
        return
    width = max(map(len, record))
    for key, value in record.items():
        print(f"{key:<{width}}  {json.dumps(value) if isinstance(value, dict | list) else value}")


def _base(cls: type, name: str) -> type:
    """The class called `name` among `cls`'s bases: recent typer vendors its own click, so
    `click.ClickException` is not the class that typer raises."""
    return next(base for base in cls.__mro__ if base.__name__ == name)


_CLICK_ERROR = _base(typer.BadParameter, "ClickException")  # bad arguments and options
_EXIT = typer.Exit  # --help, and (recent typer) Ctrl-C, as Exit(130)
_INTERRUPTED = 130


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error(message: str) -> None:
    print(f"anyshape: error: {_one_line(message)}", file=sys.stderr)


def _interrupted() -> int:
    print("anyshape: interrupted; nothing partial was left behind", file=sys.stderr)
    return _INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status: 0 on success, 2 for bad input (with a one-line
    message on stderr that names the problem and its fix), 130 when interrupted."""
    from anyshape.cli import (  # noqa: F401  (registers them)
        bench,
        chat,
        compress,
        evaluate,
        export,
        extract,
        importance,
        info,
        layers,
        prune,
        report,
        route,
        rpd,
        search,
        share,
        sort,
        train,
    )

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:  # `anyshape` alone teaches, like `anyshape --help`
        args = ["--help"]
    try:
        status = app(args=args, prog_name="anyshape", standalone_mode=False)
    except AnyshapeError as error:
        _error(str(error))
        return 2
    except _EXIT as exit_:
        status = exit_.exit_code
    except _CLICK_ERROR as error:  # a bad argument or option
        command = getattr(getattr(error, "ctx", None), "command_path", None) or "anyshape"
        _error(f"{error.format_message()} (see {command} --help)")
        return 2
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C (older typer, on click, raises Abort)
        return _interrupted()
    # Without standalone mode an Exit (e.g. from --help) comes back as its exit code, and a
    # command's own return value (None) as itself.
    status = status if isinstance(status, int) and not isinstance(status, bool) else 0
    return _interrupted() if status == _INTERRUPTED else status
