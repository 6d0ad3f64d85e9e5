"""Options that `evaluate` and `report` share for lm-eval tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
BatchSizeOpt = Annotated[int, typer.Option(help="For --tasks: requests per forward pass.", min=1, metavar="N")]
