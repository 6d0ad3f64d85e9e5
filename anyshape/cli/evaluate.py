"""`anyshape evaluate` (alias `eval`): perplexity on a text, and zero-shot accuracy on lm-eval
tasks, of a model or of a Shape of it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from anyshape.checkpoints import load, load_config, load_tokenizer
from anyshape.cli.app import app, emit
from anyshape.cli.options import IncludePathOpt, JsonOpt, LimitOpt, ModelArg, ShapeOpt, TaskBatchSizeOpt, TasksOpt
from anyshape.data.text import DEFAULT_TEXT_NAME, load_text
from anyshape.evaluate import BATCH_SIZE
from anyshape.evaluate import perplexity as ppl_protocol
from anyshape.extras import require
from anyshape.shape import Shape

if TYPE_CHECKING:  # lm-eval is imported only for --tasks
    from anyshape.evaluate.harness import TaskScore


@app.command("evaluate")
def evaluate(
    model: ModelArg,
    shape: ShapeOpt = None,
    ppl: Annotated[
        bool | None,
        typer.Option(
            "--ppl/--no-ppl", help="Measure perplexity. Default: on, unless --tasks is given.", show_default=False
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help=f'For --ppl: a .txt or .jsonl ("text" field) file. Default: {DEFAULT_TEXT_NAME}.',
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    window: Annotated[int, typer.Option(help="For --ppl: tokens per window.", min=2)] = ppl_protocol.WINDOW,
    stride: Annotated[
        int | None,
        typer.Option(
            help="For --ppl: tokens between window starts (<= window). Default: the window (disjoint windows).",
            min=1,
            show_default=False,
        ),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(help="For --ppl: tokens of the text to use.", min=2)
    ] = ppl_protocol.MAX_TOKENS,
    tasks: TasksOpt = None,
    include_path: IncludePathOpt = None,
    limit: LimitOpt = None,
    batch_size: TaskBatchSizeOpt = BATCH_SIZE,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate MODEL (or SHAPE of it): perplexity by a sliding window over a text, and
    zero-shot accuracy on lm-eval tasks.

    Perplexity (--ppl): windows of WINDOW tokens start every STRIDE tokens; each scores the
    tokens no earlier window scored, except its own first token. Perplexity = exp(mean
    negative log-likelihood). By default the windows are disjoint (STRIDE = WINDOW); a smaller
    STRIDE gives every token at least WINDOW - STRIDE tokens of context, at more cost.

    Tasks (--tasks): lm-eval's tasks, or those defined by the YAML files under --include-path,
    scored as lm-eval's own `hf` model scores them (greedy generation), with no files written.
    Each metric is printed with its standard error. Relative data_files of a task YAML are read
    from the working directory, beside the YAML, or from the YAML's parent folder.

    \b
    Example: anyshape evaluate out/small --ppl --json
    """
    task_names = [name.strip() for name in tasks.split(",") if name.strip()] if tasks is not None else None
    ppl = task_names is None if ppl is None else ppl
    if not ppl and task_names is None:
        raise typer.BadParameter("nothing to evaluate; pass --ppl or --tasks", param_hint="--ppl")
    if task_names is None:
        for name, value in (("--include-path", include_path), ("--limit", limit)):
            if value is not None:
                raise typer.BadParameter(f"{name} applies to --tasks; pass --tasks too", param_hint=name)
    if not ppl and data is not None:
        raise typer.BadParameter("--data applies to perplexity; pass --ppl too", param_hint="--data")
    if stride is None:  # the protocol's default, disjoint windows, at any window
        stride = window
    if stride > window:
        raise typer.BadParameter(
            f"stride {stride} is larger than window {window}, so tokens between windows would be "
            f"skipped; pass a --stride of at most {window} or a larger --window",
            param_hint="--stride",
        )
    if task_names is not None:
        require("lm_eval", "anyshape evaluate --tasks")
        from anyshape.evaluate import harness
    # Everything that can fail fast does so before the slow load.
    chosen = Shape.parse(shape, load_config(model)) if shape is not None else None
    tokenizer = load_tokenizer(model)
    if ppl:
        token_ids = ppl_protocol.tokenize(tokenizer, load_text(data), max_tokens)
        ppl_protocol.windows(len(token_ids), window, stride)  # a too-short text fails here
    if task_names is not None:
        harness.find_tasks(task_names, include_path)
    elastic = load(model)
    chosen = chosen or elastic.full_shape
    record = {"model": model, "shape": chosen.to_dict(), "num_parameters": chosen.num_parameters(elastic.config)}
    if ppl:
        result = ppl_protocol.perplexity(elastic, token_ids, chosen, window, stride, progress=True)
        record |= {"data": str(data) if data else DEFAULT_TEXT_NAME, **result.to_dict()}
    if task_names is not None:
        results = harness.evaluate_tasks(elastic, tokenizer, chosen, task_names, include_path, limit, batch_size)
        record |= {"limit": limit, **results.to_dict()}
    if task_names is None or as_json:
        emit(record, as_json)
    else:  # key-value lines, then the metrics as a table
        emit({key: value for key, value in record.items() if key != "tasks"}, as_json)
        print()
        _print_table(results.scores)


app.command("eval", hidden=True)(evaluate)  # the command's former name


def _print_table(scores: list[TaskScore]) -> None:
    """One aligned row per metric: task, metric, value, standard error."""
    rows = [("task", "metric", "value", "stderr")]
    rows += [(s.task, s.metric, _number(s.value), "-" if s.stderr is None else _number(s.stderr)) for s in scores]
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    for task, metric, value, stderr in rows:
        print(f"{task:<{widths[0]}}  {metric:<{widths[1]}}  {value:>{widths[2]}}  {stderr:>{widths[3]}}")


def _number(value: float) -> str:
    """Four decimals; in scientific notation from a million on (e.g. a perplexity)."""
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4e}"
