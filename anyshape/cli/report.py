"""`anyshape report`: the deployment report of a family (parameters, file size, perplexity,
task accuracy, speed and memory of the parent and every member), as markdown, JSON and PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from anyshape.cli.app import app
from anyshape.cli.options import (
    ForceOpt,
    IncludePathOpt,
    JsonOpt,
    LimitOpt,
    TaskBatchSizeOpt,
    TasksOpt,
    out_option,
    overwrite_option,
    overwriting,
)
from anyshape.data.text import DEFAULT_TEXT_NAME
from anyshape.deploy.report import (
    DEFAULT_NAME,
    ReportSettings,
    family_report,
    markdown_report,
    report_files,
    write_family_report,
)
from anyshape.deploy.speed import RUNTIMES, SpeedSettings
from anyshape.evaluate import BATCH_SIZE
from anyshape.evaluate.perplexity import MAX_TOKENS
from anyshape.extras import require

_SPEED = SpeedSettings()


@app.command()
def report(
    family: Annotated[
        Path,
        typer.Argument(help="A family folder written by `anyshape compress`.", metavar="FAMILY", show_default=False),
    ],
    tasks: TasksOpt = None,
    include_path: IncludePathOpt = None,
    limit: LimitOpt = None,
    batch_size: TaskBatchSizeOpt = BATCH_SIZE,
    data: Annotated[
        Path | None,
        typer.Option(
            help=f'Perplexity text: a .txt or .jsonl ("text" field) file. Default: {DEFAULT_TEXT_NAME}.',
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens of the text to score.", min=2)] = MAX_TOKENS,
    prompt_tokens: Annotated[int, typer.Option(help="Speed: tokens in the prefill.", min=1)] = _SPEED.prompt_tokens,
    gen_tokens: Annotated[int, typer.Option(help="Speed: tokens decoded one at a time.", min=1)] = _SPEED.gen_tokens,
    repeats: Annotated[int, typer.Option(help="Speed: timed repeats (median reported).", min=1)] = _SPEED.repeats,
    runtimes: Annotated[
        str, typer.Option(help=f"Speed: comma-separated runtimes among {', '.join(RUNTIMES)}.", metavar="RUNTIMES")
    ] = "anyshape",
    speed: Annotated[bool, typer.Option("--speed/--no-speed", help="Measure speed and memory.")] = True,
    out: out_option(
        f"The markdown report; its .json and .png go beside it. Default: FAMILY/{DEFAULT_NAME}.",
        metavar="FILE",
        optional=True,
    ) = None,
    overwrite: overwrite_option("Replace the report files if they exist.") = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Report on a FAMILY written by `anyshape compress`: for its parent (summary.json's "model",
    whole) and every member, parameters (total and non-embedding), weight file size, perplexity
    (as `anyshape evaluate --ppl`), zero-shot task accuracy with standard errors (--tasks), and
    prefill/decode tokens/s and peak memory at batch 1 (as `anyshape bench`). A trained family
    also gets, after each member, a row of its zero-shot Shape (the untrained slice of the sorted
    parent), so the table shows what training bought.

    Writes one markdown table (--out), the same numbers as JSON and a PNG of accuracy,
    perplexity and decode speed against parameters, beside it. Prints the table, or with
    --json the JSON.

    \b
    Example: anyshape report family/ --tasks hellaswag_local --include-path tasks/ --limit 200
    """
    task_names = tuple(name.strip() for name in tasks.split(",") if name.strip()) if tasks is not None else ()
    if not task_names:
        for name, value in (("--tasks", tasks), ("--include-path", include_path), ("--limit", limit)):
            if value is not None:
                raise typer.BadParameter(f"{name} needs task names, e.g. --tasks hellaswag_local", param_hint=name)
    chosen_runtimes = tuple(name.strip() for name in runtimes.split(",") if name.strip())
    if not chosen_runtimes or not set(chosen_runtimes) <= set(RUNTIMES):
        raise typer.BadParameter(f"{runtimes!r}: choose one or more of {', '.join(RUNTIMES)}", param_hint="--runtimes")
    require("matplotlib", "anyshape report")  # its plots; checked before the long measurements
    if task_names:
        require("lm_eval", "anyshape report --tasks")
    overwrite = overwriting(overwrite, force)
    out = out or family / DEFAULT_NAME
    _check_out(out, overwrite)
    settings = ReportSettings(
        tasks=task_names,
        include_path=str(include_path) if include_path else None,
        limit=limit,
        batch_size=batch_size,
        data=str(data) if data else None,
        max_tokens=max_tokens,
        speed=SpeedSettings(prompt_tokens, gen_tokens, repeats) if speed else None,
        runtimes=chosen_runtimes,
    )
    result = family_report(family, settings, progress=True)
    paths = write_family_report(result, out, overwrite=overwrite)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
        return
    table = [line for line in markdown_report(result, paths[2].name).splitlines() if line.startswith("|")]
    print("\n".join(table))
    print(f"\nwritten: {', '.join(map(str, paths))}")


def _check_out(out: Path, overwrite: bool) -> None:
    """Fails fast, before the long measurements, on a report path that cannot be written."""
    if out.suffix != ".md":
        raise typer.BadParameter(
            f"{out} does not end in .md; name the markdown report, e.g. report.md", param_hint="--out"
        )
    for path in report_files(out):
        if path.is_dir():
            raise typer.BadParameter(f"{path} is a folder; choose another --out", param_hint="--out")
        if path.exists() and not overwrite:
            raise typer.BadParameter(
                f"{path} already exists; choose another --out or pass --overwrite", param_hint="--out"
            )
