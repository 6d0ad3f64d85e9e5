"""compress's chosen Shape vs the single-axis heuristics on SmolLM2-135M, WikiText-2 protocol.

    .venv/bin/python bench/compress.py              # about 25 minutes on 2 idle cores
    .venv/bin/python bench/compress.py --quick      # a smoke run: fewer trials and tokens

1. `compress` runs on SmolLM2 with budgets of 50% and 75% of the non-embedding parameters,
   calibrating on ../shared/data/wikitext-2/wiki.valid.tokens (its default settings
   otherwise), and its stage wall times are printed.
2. Every Shape is then measured on the WikiText-2 test protocol (../shared/data/wikitext-2/
   README.md: 64 disjoint windows of 512 tokens, 32,704 scored tokens): the chosen Shape as
   exported (compensated or not, as compress chose), and plain; the single-axis heuristics at
   the same budget (MLP-only, hidden-only, depth-only; LLaMaFlex Table C4), plain and with the
   same calibrated compensation. All on the same importance-sorted parent.
Goals: at 50%, the chosen Shape with compensation at most 0.5x the best single-axis
heuristic's perplexity; at 75%, at most 2x the dense perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import anyshape
from anyshape.compress.baselines import HEURISTICS
from anyshape.compress.compensate import compensate
from anyshape.compress.pipeline import CompressSettings, compress
from anyshape.compress.report import describe
from anyshape.data.calibration import random_windows
from anyshape.data.text import read_text, wikitext_text
from anyshape.evaluate.perplexity import MAX_TOKENS, perplexity, tokenize
from anyshape.importance.permute import sort_
from anyshape.importance.scores import Scores
from anyshape.shape import Shape

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
HALF_GOAL = 0.5  # chosen (compensated) / best single-axis heuristic at 50%
THREE_QUARTER_GOAL = 2.0  # chosen / dense at 75%


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 trials per budget, 4,096 test tokens")
    parser.add_argument("--out", type=Path, default=Path("bench/results/family"), help="the family folder")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--trials", type=int, default=CompressSettings.trials, help="Shapes searched per budget")
    parser.add_argument("--num-sequences", type=int, default=CompressSettings.num_sequences,
                        help="calibration windows of 512 tokens (scores, compensation)")  # fmt: skip
    parser.add_argument("--ridge", type=float, default=CompressSettings.ridge, help="compensation ridge")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    settings = CompressSettings(
        budgets=(0.5, 0.75),
        budget_basis="non-embedding",
        data=str(DATA / "wiki.valid.tokens"),
        num_sequences=args.num_sequences,
        trials=4 if args.quick else args.trials,
        ridge=args.ridge,
        train_tokens=0,  # the zero-shot family: bench/heal.py measures what training adds
    )
    print(f"compress: {settings}", flush=True)
    summary = compress("smollm2-135m", args.out, settings, overwrite=True, log=lambda m: print(m, flush=True))

    tokenizer = anyshape.load_tokenizer("smollm2-135m")
    test_ids = tokenize(tokenizer, wikitext_text(DATA / "wiki.test.raw"), 4096 if args.quick else MAX_TOKENS)
    parent = anyshape.load("smollm2-135m")
    sort_(parent, Scores.load(args.out / "stages" / "scores.safetensors", parent.config))
    fit_ids = calibration_split(tokenizer, settings)
    config = parent.config
    full = Shape.full(config).num_parameters(config, embeddings=False)

    def ppl(model, shape=None) -> float:
        return perplexity(model, test_ids, shape, progress=True).perplexity

    dense = ppl(parent)
    print(f"dense perplexity {dense:.2f} on {len(test_ids)} tokens", flush=True)
    results = {"dense": dense, "tokens": len(test_ids), "rows": [], "stages": summary["stages"]}

    def report() -> None:
        results["seconds"] = round(time.perf_counter() - started)
        print(markdown(results), flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))

    # Pass 1, what the goals need: the chosen Shapes (plain and compensated), every heuristic plain.
    for member in summary["members"]:
        shape = Shape.from_dict(member["shape"], config)
        compensated = (
            anyshape.load(args.out / member["folder"])  # as exported
            if member["compensated"]
            else compensate(parent, shape, fit_ids, ridge=settings.ridge, progress=True)
        )
        results["rows"].append(
            row(member["budget"], "chosen", shape, config, full, ppl(parent, shape), ppl(compensated), member)
        )
        for name in HEURISTICS:
            baseline = member["baselines"][name]
            heuristic = None if baseline is None else Shape.from_dict(baseline["shape"], config)
            plain = None if heuristic is None else ppl(parent, heuristic)
            results["rows"].append(row(member["budget"], name, heuristic, config, full, plain, None))
        report()
    # Pass 2: the heuristics with the same compensation.
    for r in results["rows"]:
        if r["method"] != "chosen" and r["shape"] is not None:
            heuristic = Shape.from_dict(r["shape"], config)
            r["ppl_compensated"] = ppl(compensate(parent, heuristic, fit_ids, ridge=settings.ridge, progress=True))
            report()
    return 0


def calibration_split(tokenizer, settings: CompressSettings) -> torch.Tensor:
    """The windows compress fitted compensation on (the same split and seed)."""
    ids = torch.tensor(tokenizer(read_text(settings.data), add_special_tokens=False)["input_ids"])
    middle = settings.eval_tokens + (len(ids) - settings.eval_tokens) // 2
    return random_windows(ids[settings.eval_tokens : middle], settings.num_sequences, settings.sequence_length,
                          settings.seed)  # fmt: skip


def row(budget, method, shape, config, full, plain, compensated, member=None) -> dict:
    """One table row; perplexities not measured yet are None."""
    return {
        "budget": budget,
        "method": method,
        "shape": None if shape is None else shape.to_dict(),
        "fraction": None if shape is None else shape.num_parameters(config, embeddings=False) / full,
        "ppl_plain": plain,
        "ppl_compensated": compensated,
        "compress_chose_compensation": None if member is None else member["compensated"],
        "source": None if member is None else member.get("source", "search"),
    }


def label(r: dict) -> str:
    """'chosen (search)', 'chosen (mlp-only)', or the heuristic's name."""
    return f"chosen ({r['source']})" if r["method"] == "chosen" else r["method"]


def _number(value: float | None) -> str:
    return "pending" if value is None else f"{value:.1f}"


def markdown(results: dict) -> str:
    dense = results["dense"]
    lines = [
        f"Dense perplexity {dense:.2f} ({results['tokens']:,} tokens).",
        "",
        "| budget | Shape | method | non-embedding fraction | PPL plain | PPL compensated |",
        "|---|---|---|---:|---:|---:|",
    ]
    verdicts = []
    for budget in sorted({r["budget"] for r in results["rows"]}):
        rows = [r for r in results["rows"] if r["budget"] == budget]
        for r in rows:
            if r["shape"] is None:
                lines.append(f"| {budget:g} | cannot reach | {r['method']} | | | |")
                continue
            lines.append(
                f"| {budget:g} | {describe(r['shape'])} | {label(r)} | {r['fraction']:.3f} | "
                f"{_number(r['ppl_plain'])} | {_number(r['ppl_compensated'])} |"
            )
        chosen = next(r for r in rows if r["method"] == "chosen")
        heuristics = [r for r in rows if r["method"] != "chosen" and r["shape"] is not None]
        best_plain = min(r["ppl_plain"] for r in heuristics)
        if math.isclose(budget, 0.5):
            ratio = chosen["ppl_compensated"] / best_plain
            verdicts.append(
                f"50%: chosen + compensation / best single-axis heuristic = {ratio:.3f} "
                f"(goal <= {HALF_GOAL}: {'met' if ratio <= HALF_GOAL else 'MISSED'})"
            )
            compensated = [r["ppl_compensated"] for r in heuristics]
            if None not in compensated:
                verdicts.append(
                    f"50%: chosen + compensation / best heuristic + compensation = "
                    f"{chosen['ppl_compensated'] / min(compensated):.3f}"
                )
        if math.isclose(budget, 0.75):
            ratio = chosen["ppl_compensated"] / dense
            verdicts.append(
                f"75%: chosen + compensation / dense = {ratio:.3f} (goal <= {THREE_QUARTER_GOAL}: "
                f"{'met' if ratio <= THREE_QUARTER_GOAL else 'MISSED'})"
            )
    lines += ["", *verdicts, "", "| stage | seconds | reused |", "|---|---:|---|"]
    lines += [f"| {k} | {v['seconds']} | {v['reused']} |" for k, v in results["stages"].items()]
    lines.append(f"\ntotal {results['seconds']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
