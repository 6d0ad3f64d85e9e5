"""`anyshape bench`: prefill and decode tokens/s and peak memory of a model, a Shape of it, or every
member of a family, in each runtime present (anyshape, transformers, llama.cpp)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch
import typer

from anyshape.checkpoints import load_config
from anyshape.cli.app import app
from anyshape.cli.options import JsonOpt, ShapeOpt
from anyshape.deploy.speed import (
    RUNTIMES,
    Rate,
    SpeedResult,
    SpeedSettings,
    benchmark,
    family_members,
    is_family,
    plot_speeds,
    write_csv,
)
from anyshape.extras import require
from anyshape.shape import Shape


@app.command()
def bench(
    model: Annotated[
        str,
        typer.Argument(
            help="Hugging Face folder, .gguf file, 'smollm2-135m', or a family folder written by `anyshape compress`.",
            metavar="MODEL_OR_FAMILY",
            show_default=False,
        ),
    ],
    shape: ShapeOpt = None,
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length, run in one forward (prefill).")] = 512,
    gen_tokens: Annotated[int, typer.Option(min=1, help="Tokens decoded one at a time through the KV cache.")] = 128,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats; the median and min-max are reported.")] = 5,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed repeats first.")] = 1,
    threads: Annotated[
        int | None, typer.Option(min=1, help="CPU threads of every runtime [default: torch's, one per core]")
    ] = None,
    runtime: Annotated[
        list[str] | None,
        typer.Option(help=f"Runtime to measure, repeatable: {', '.join(RUNTIMES)} [default: all]", show_default=False),
    ] = None,
    gguf_type: Annotated[
        str, typer.Option(help="Weights of the GGUF that llama.cpp runs: f32, f16, bf16, q8_0.")
    ] = "q8_0",
    csv: Annotated[Path | None, typer.Option(help="Also write one CSV row per model and runtime.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Also write a PNG: tokens/s per model and runtime.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure generation speed at batch 1 on the CPU: prefill tokens/s (the prompt in one
    forward), decode tokens/s (one token at a time with the KV cache), and the peak memory
    growth while each runtime loads and runs.

    Runtimes: anyshape (the elastic model at SHAPE), transformers (the Shape exported as a
    Hugging Face folder) and llama.cpp (exported as GGUF; only when llama-cpp-python is
    installed, otherwise skipped with the reason). For a family folder, every member is
    measured.

    \b
    Example: anyshape bench family/ --prompt-tokens 512 --gen-tokens 128 --json
    """
    chosen_runtimes = tuple(runtime or RUNTIMES)
    for name in chosen_runtimes:
        if name not in RUNTIMES:
            raise typer.BadParameter(f"{name!r} is not one of {', '.join(RUNTIMES)}", param_hint="--runtime")
    for option, path in (("--csv", csv), ("--plot", plot)):
        if path is not None and not path.parent.is_dir():
            raise typer.BadParameter(f"the folder of {path} does not exist; create it first", param_hint=option)
    if plot is not None:
        require("matplotlib", "anyshape bench --plot")
    settings = SpeedSettings(prompt_tokens, gen_tokens, repeats, warmup, threads or torch.get_num_threads(), gguf_type)
    if is_family(model):
        if shape is not None:
            raise typer.BadParameter(
                f"{model} is a family, whose members are Shapes already; pass one member folder to --shape it",
                param_hint="--shape",
            )
        models, chosen = [(name, str(folder)) for name, folder in family_members(model)], None
    else:
        models = [(model, model)]  # (label, reference)
        chosen = Shape.parse(shape, load_config(model)) if shape is not None else None

    results, skipped = [], []
    for label, ref in models:
        measured, left_out = benchmark(ref, chosen, settings, chosen_runtimes, label, log=_progress)
        results += measured
        skipped += left_out
    if csv is not None:
        write_csv(results, settings, csv)
    if plot is not None:
        plot_speeds(results, plot)

    if as_json:
        record = {
            "model": model,
            "shape": chosen.to_dict() if chosen is not None else None,
            "settings": asdict(settings),
            "cpu_count": os.cpu_count(),
            "results": [r.to_dict() for r in results],
            "skipped": [asdict(s) for s in skipped],
        }
        print(json.dumps(record, indent=2))
        return
    _print_table(results, settings)
    for s in skipped:
        print(f"skipped {s.runtime} on {s.model}: {s.reason}")


def _print_table(results: list[SpeedResult], settings: SpeedSettings) -> None:
    print(
        f"batch 1, {settings.prompt_tokens} prompt tokens, {settings.gen_tokens} decoded, {settings.threads} threads; "
        f"median (min-max) of {settings.repeats} repeats"
    )
    rows = [("model", "runtime", "prefill tok/s", "decode tok/s", "peak MiB")]
    for r in results:
        memory = f"{r.peak_rss_mib:.0f}" if r.peak_rss_mib is not None else "n/a"
        rows.append((r.model, r.runtime, _rate(r.prefill), _rate(r.decode), memory))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _rate(rate: Rate) -> str:
    return f"{rate.median:.1f} ({rate.min:.1f}-{rate.max:.1f})"


def _progress(message: str) -> None:
    print(f"measuring {message}", file=sys.stderr)
