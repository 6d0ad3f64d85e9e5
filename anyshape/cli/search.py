"""`anyshape search`: the Pareto front of a model's Shapes under budgets."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from anyshape.checkpoints import load, load_config, resolve
from anyshape.cli.app import app, emit
from anyshape.cli.calibration import read_calibration
from anyshape.cli.options import AlignOpt, BatchSizeOpt, DataOpt, JsonOpt, ModelArg, SeedOpt, out_option
from anyshape.compress.report import describe
from anyshape.extras import require
from anyshape.importance.permute import sort_
from anyshape.importance.scores import Scores, scores_beside
from anyshape.model.config import LlamaFamilyConfig
from anyshape.search.algorithms import ALGORITHMS, search
from anyshape.search.objectives import COSTS, QUALITIES, LatencyTable, Quality, cost_functions
from anyshape.search.space import DEFAULT_ALIGN, SearchSpace, parse_fractions
from anyshape.shape import Shape

UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}


def parse_count(text: str, config: LlamaFamilyConfig, option: str) -> float:
    """'60M' -> 6e7 parameters; a number <= 1 is a fraction of the parent's total parameters."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a parameter count such as 60M, 1.5B or 0.5", param_hint=option)
    value = float(match[1]) * UNITS[match[2].lower()]
    if value <= 1 and not match[2]:
        value *= Shape.full(config).num_parameters(config)
    return value


def parse_objectives(text: str) -> tuple[list[str], str]:
    """'params,ppl' -> (['params'], 'ppl'): cost objectives and exactly one quality objective."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in COSTS and name not in QUALITIES]
    qualities = [name for name in names if name in QUALITIES]
    if unknown or len(qualities) != 1 or len(names) < 2:
        raise typer.BadParameter(
            f"{text!r}: give one or more costs ({', '.join(COSTS)}) and one quality ({', '.join(QUALITIES)}), "
            "e.g. params,ppl",
            param_hint="--objectives",
        )
    return [name for name in names if name in COSTS], qualities[0]


@app.command("search")
def search_command(
    model: ModelArg,
    scores: Annotated[
        Path | None,
        typer.Option(help="Scores from `anyshape importance`: sort by them first (recommended).", show_default=False),
    ] = None,
    objectives: Annotated[
        str, typer.Option(help=f"Costs ({', '.join(COSTS)}) and one quality ({', '.join(QUALITIES)}) to minimise.")
    ] = "params,ppl",
    algorithm: Annotated[str, typer.Option(help=f"One of {', '.join(ALGORITHMS)}.")] = "nsga2",
    trials: Annotated[int, typer.Option(help="Shapes to evaluate (distinct, within the bounds).", min=1)] = 50,
    out: out_option("Result file (JSON); the plot is written beside it (.png).") = Path("pareto.json"),
    max_params: Annotated[
        str | None, typer.Option(help="Upper bound: a count (60M) or a fraction of the parent (0.5).")
    ] = None,
    min_params: Annotated[str | None, typer.Option(help="Lower bound, as --max-params.")] = None,
    max_latency_ms: Annotated[
        float | None, typer.Option(help="Upper bound on the measured decode-step latency (ms).", min=0)
    ] = None,
    device: Annotated[str, typer.Option(help="Device that runs and times the Shapes: cpu, cuda, cuda:1...")] = "cpu",
    latency_table: Annotated[
        Path, typer.Option(help="Measured latencies, reused across searches on the same device.")
    ] = Path("~/.cache/anyshape/latency.json"),
    prompt_tokens: Annotated[int, typer.Option(help="Prefill length for latency.", min=1)] = 128,
    fractions: Annotated[str, typer.Option(help="Grid of sizes per axis, as fractions of the parent.")] = (
        "0.25,0.375,0.5,0.625,0.75,0.875,1"
    ),
    align: AlignOpt = DEFAULT_ALIGN,
    data: DataOpt = None,
    num_sequences: Annotated[int, typer.Option(help="Calibration windows for the quality.", min=1)] = 8,
    sequence_length: Annotated[int, typer.Option(help="Tokens per window.", min=2)] = 256,
    seed: SeedOpt = 0,
    batch_size: BatchSizeOpt = 4,
    as_json: JsonOpt = False,
) -> None:
    """Search MODEL's Shapes for the best trade-offs: every axis (layers, hidden size, KV
    groups, query heads per group, MLP size) takes sizes from a grid of fractions.

    Evaluated Shapes and the Pareto front go to OUT (JSON), with a plot of quality vs each
    cost. Quality is perplexity (ppl) or KD loss against the full model (kd) on calibration
    windows; latency is measured on DEVICE once per Shape and kept in LATENCY_TABLE.

    \b
    Examples:
      anyshape search smollm2-135m --scores scores.safetensors --objectives params,ppl --trials 200
      anyshape search smollm2-135m --objectives latency,ppl --device cpu --max-latency-ms 40
    """
    import torch

    costs, quality_name = parse_objectives(objectives)
    if algorithm not in ALGORITHMS:
        raise typer.BadParameter(f"{algorithm!r} is not one of {', '.join(ALGORITHMS)}", param_hint="--algorithm")
    if algorithm == "nsga2":
        require("optuna", "anyshape search --algorithm nsga2")
    require("matplotlib", "anyshape search")  # the plot beside OUT
    config = load_config(model)
    grid = parse_fractions(fractions)
    bounds: dict[str, tuple[float | None, float | None]] = {}
    if max_params is not None or min_params is not None:
        low = parse_count(min_params, config, "--min-params") if min_params is not None else None
        high = parse_count(max_params, config, "--max-params") if max_params is not None else None
        bounds["params"] = (low, high)
    if max_latency_ms is not None:
        bounds["latency"] = (None, max_latency_ms)
    smallest = SearchSpace.from_fractions(config, grid, align=align).smallest().num_parameters(config)
    if "params" in bounds and bounds["params"][1] is not None and bounds["params"][1] < smallest:
        raise typer.BadParameter(
            f"no Shape of the search space has at most {bounds['params'][1]:,.0f} parameters; the smallest has "
            f"{smallest:,} ({smallest / Shape.full(config).num_parameters(config):.3f} of the parent)",
            param_hint="--max-params",
        )
    sorted_scores = Scores.load(scores, config) if scores is not None else scores_beside(resolve(model), config)
    input_ids = read_calibration(model, data, num_sequences, sequence_length, seed)
    elastic = load(model).to(torch.device(device))
    ranking = None
    if sorted_scores is not None:
        if scores is not None:
            sorted_scores = sort_(elastic, sorted_scores)
        ranking = sorted_scores.layers.argsort(descending=True, stable=True).tolist()
    space = SearchSpace.from_fractions(config, grid, ranking, align)
    needs_latency = "latency" in costs or "prefill" in costs or "latency" in bounds
    table = (
        LatencyTable(latency_table.expanduser(), str(resolve(model)), device, prompt_tokens) if needs_latency else None
    )
    result = search(
        space, Quality(elastic, input_ids, quality_name, batch_size), cost_functions(elastic, table), costs, algorithm,
        trials, seed, bounds, quality_name, progress=True,
    )  # fmt: skip
    result.settings.update(model=model, scores=str(scores) if scores else None, space=space.to_dict())
    result.save(out)
    front = result.front()
    if front:
        plot_path = out.with_suffix(".png")
        from anyshape.search.pareto import plot_front

        plot_front([t.to_dict(quality_name) for t in result.trials], [t.to_dict(quality_name) for t in front],
                   costs, quality_name, plot_path)  # fmt: skip
    record = {
        "out": str(out),
        "plot": str(out.with_suffix(".png")) if front else None,
        "evaluated": len(result.trials),
        "draws": result.draws,
        "pareto_front": [t.to_dict(quality_name) for t in front],
    }
    if not as_json:
        record["pareto_front"] = {
            describe(t.shape.to_dict()): "  ".join(f"{k} {v:,.4g}" for k, v in t.to_dict(quality_name).items()
                                                   if k != "shape")
            for t in front
        }  # fmt: skip
    emit(record, as_json)
