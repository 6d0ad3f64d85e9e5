"""The `anyshape` entry point: registers every command on the app, runs it, and turns errors
into one line on stderr and an exit status (0 success, 2 bad input, 130 interrupted)."""

from __future__ import annotations

import sys

import typer

from anyshape.cli import (  # noqa: F401  (each registers its command on the app)
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
    serve,
    share,
    sort,
    train,
)
from anyshape.cli.app import app
from anyshape.errors import AnyshapeError


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
