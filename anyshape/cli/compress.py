"""`anyshape compress`: the main job, importance -> sort -> search per budget -> export -> report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from anyshape.cli.app import app, emit
from anyshape.cli.options import AlignOpt, DataOpt, JsonOpt, ModelArg, SeedOpt, out_option, overwrite_option
from anyshape.compress.pipeline import CompressSettings, compress
from anyshape.compress.report import describe
from anyshape.extras import require
from anyshape.search.space import parse_fractions

DEFAULTS = CompressSettings()
TRAINING = "Training (the elastic run the members come from)"


@app.command("compress")
def compress_command(
    model: ModelArg,
    out: out_option("Family folder (written when complete).") = Path("family"),
    budgets: Annotated[str, typer.Option(help="Parameter budgets, fractions of the parent.")] = "0.25,0.5,0.75",
    budget_basis: Annotated[
        str, typer.Option(help="total or non-embedding: which parameters the budgets count.")
    ] = DEFAULTS.budget_basis,
    data: DataOpt = None,
    num_sequences: Annotated[
        int, typer.Option(help="Calibration windows for scores and compensation.", min=1)
    ] = DEFAULTS.num_sequences,
    sequence_length: Annotated[int, typer.Option(help="Tokens per calibration window.", min=2)] = (
        DEFAULTS.sequence_length
    ),
    search_sequences: Annotated[int, typer.Option(help="Windows of the search's perplexity proxy.", min=1)] = (
        DEFAULTS.search_sequences
    ),
    search_length: Annotated[int, typer.Option(help="Tokens per proxy window.", min=2)] = DEFAULTS.search_length,
    fractions: Annotated[str, typer.Option(help="Grid of sizes per axis, as fractions of the parent.")] = (
        "0.25,0.375,0.5,0.625,0.75,0.875,1"
    ),
    align: AlignOpt = DEFAULTS.align,
    depth_method: Annotated[str, typer.Option(help="Layer ranking: bi, drop or dp.")] = DEFAULTS.depth_method,
    algorithm: Annotated[str, typer.Option(help="Search: nsga2, bins or random.")] = DEFAULTS.algorithm,
    trials: Annotated[int, typer.Option(help="Shapes evaluated per budget.", min=1)] = DEFAULTS.trials,
    band: Annotated[float, typer.Option(help="Search Shapes within [(1 - band) B, B] for budget B.")] = DEFAULTS.band,
    candidates: Annotated[
        int,
        typer.Option(
            help="Per budget, the Shapes of lowest proxy perplexity (searched, or single-axis) that are "
            "compensated and compared on held-out windows.",
            min=1,
        ),
    ] = DEFAULTS.candidates,
    compensate: Annotated[
        bool | None,
        typer.Option(
            "--compensate/--no-compensate",
            help="Re-fit o_proj/down_proj by least squares. Default: when it helps on held-out windows.",
            show_default=False,
        ),
    ] = None,
    ridge: Annotated[float, typer.Option(help="Ridge of the compensation, relative to the mean Gram diagonal.")] = (
        DEFAULTS.ridge
    ),
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens for the final perplexities.", min=512)] = (
        DEFAULTS.eval_tokens
    ),
    dtype: Annotated[str, typer.Option(help="Exported weights: float32, bfloat16 or float16.")] = DEFAULTS.dtype,
    train_tokens: Annotated[
        int,
        typer.Option(
            help="Tokens of the elastic training that every member comes from, distilled from the frozen parent "
            "(about 4 minutes on a 2-core CPU by default; on a GPU use 100M or more). 0: a zero-shot family.",
            min=0,
            rich_help_panel=TRAINING,
        ),
    ] = DEFAULTS.train_tokens,
    train_seq_len: Annotated[
        int, typer.Option(help="Tokens per training sequence.", min=2, rich_help_panel=TRAINING)
    ] = DEFAULTS.train_seq_len,
    train_batch_size: Annotated[
        int, typer.Option(help="Sequences per training step.", min=1, rich_help_panel=TRAINING)
    ] = DEFAULTS.train_batch_size,
    train_lr: Annotated[
        float, typer.Option(help="Peak learning rate (warmup, then cosine).", min=0, rich_help_panel=TRAINING)
    ] = DEFAULTS.train_lr,
    train_text: Annotated[
        str,
        typer.Option(
            help="What the elastic run trains on: parent (text the parent samples itself: no corpus needed, "
            "the parent's own distribution, and better than the embedded text on general tasks) or data "
            "(the calibration half of --data: your corpus).",
            rich_help_panel=TRAINING,
        ),
    ] = DEFAULTS.train_text,
    seed: SeedOpt = 0,
    overwrite: overwrite_option("Replace OUT if it holds a family made with other settings.") = False,
    as_json: JsonOpt = False,
) -> None:
    """Compress MODEL into a family of smaller standard models, one per budget.

    Stages: importance scores, exact sorting, layer ranking, a search per budget (the best
    Shape by proxy perplexity within the budget), one elastic training of the sorted model in
    which those Shapes and samples of every size learn from the frozen parent (kept as
    OUT/elastic/, a model every command takes), the search's best Shapes ranked again on it,
    calibrated compensation when it helps, export (OUT/<budget>/, loadable by transformers),
    perplexity and latency of every member against the single-axis heuristics (MLP-only,
    hidden-only, depth-only) at the same budget and against its zero-shot Shape, and
    OUT/report.md, OUT/pareto.png, OUT/summary.json.

    Re-running with the same OUT resumes: finished stages whose inputs are unchanged are
    reused, so an interrupted run loses at most the stage it was in (training: at most an
    eighth of it, from its last checkpoint).

    \b
    Examples:
      anyshape compress smollm2-135m
      anyshape compress smollm2-135m --budgets 0.25,0.5,0.75 --out family/
      anyshape compress smollm2-135m --train-tokens 0          # zero-shot: no training
      anyshape compress MODEL --data corpus.txt --train-tokens 200000000   # on a GPU
      anyshape extract family/elastic --shape '{"intermediate_size": 768}' --out m/
    """
    try:
        budget_values = tuple(float(b) for b in budgets.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"{budgets!r} must be comma-separated fractions, e.g. 0.25,0.5", param_hint="--budgets"
        ) from None
    if algorithm == "nsga2":
        require("optuna", "anyshape compress --algorithm nsga2")
    require("matplotlib", "anyshape compress")  # OUT/pareto.png
    settings = CompressSettings(
        budgets=budget_values,
        budget_basis=budget_basis,
        data=str(data) if data is not None else None,
        num_sequences=num_sequences,
        sequence_length=sequence_length,
        search_sequences=search_sequences,
        search_length=search_length,
        fractions=parse_fractions(fractions),
        align=align,
        depth_method=depth_method,
        algorithm=algorithm,
        trials=trials,
        band=band,
        candidates=candidates,
        compensate={None: "auto", True: "on", False: "off"}[compensate],
        ridge=ridge,
        eval_tokens=eval_tokens,
        seed=seed,
        dtype=dtype,
        train_tokens=train_tokens,
        train_seq_len=train_seq_len,
        train_batch_size=train_batch_size,
        train_lr=train_lr,
        train_text=train_text,
    )
    summary = compress(model, out, settings, overwrite, log=lambda message: print(message, file=sys.stderr))
    record = {
        "out": str(out),
        "report": str(out / "report.md"),
        "parent_ppl": summary["parent"]["ppl"],
        "members": [
            {
                "folder": str(out / member["folder"]),
                "budget": member["budget"],
                "shape": member["shape"],
                "num_parameters": member["num_parameters"],
                "ppl": member["ppl"],
                "compensated": member["compensated"],
            }
            for member in summary["members"]
        ],
    }
    if not as_json:
        record["members"] = {
            m["folder"]: f"{describe(m['shape'])}  {m['num_parameters']:,} params  ppl {m['ppl']:.2f}"
            + ("  (compensated)" if m["compensated"] else "")
            for m in record["members"]
        }
    emit(record, as_json)
