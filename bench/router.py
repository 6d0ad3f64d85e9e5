"""A learned budget router vs single-axis heuristics and search (LLaMaFlex Table A1 on SmolLM2).

    .venv/bin/python bench/router.py                 # the defaults below, on this machine
    .venv/bin/python bench/router.py --quick         # a smoke run: 2 steps, 4,096 test tokens
    .venv/bin/python bench/router.py --joint         # the model trains with the router (below)

1. The parent is SmolLM2 sorted by importance (as in bench/train.py), weights frozen.
2. `anyshape train --router --router-only`: a router over a fine grid (1/16 steps of every axis,
   widths multiples of 32) trains alone at anchor budgets 25/50/75/100% of the total
   parameters, on wiki.valid.tokens, by forward-KL distillation from the parent.
3. Validation loss (mean next-token NLL, nats) on the WikiText-2 test protocol of:
   - at 50% and 25%: the router's Shape, and the MLP-only, hidden-only and depth-only Shapes at
     the same budget (the largest that fits);
   - at 37.5% and 62.5% (interpolated, never trained): the router's Shape, and the best of a
     random search of `--search-trials` Shapes of the same grid within 90-100% of the budget,
     by calibration perplexity (16 x 256 tokens of wiki.valid.tokens).
Goals: the router beats all three heuristics at 50% and 25%; at 37.5% and 62.5% its loss is
within 3% of the search's.

With `--joint` the model trains with the router (LLaMaFlex's main setting: full fine-tuning at
the Shapes the router samples, distilled from the parent), and every Shape is evaluated, and
searched, on the trained weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import anyshape
from anyshape.compress.baselines import HEURISTICS, single_axis_shapes
from anyshape.compress.report import describe
from anyshape.data.calibration import calibration_ids
from anyshape.data.text import read_text, wikitext_text
from anyshape.evaluate.perplexity import MAX_TOKENS, perplexity, tokenize
from anyshape.router.control import RouterControl, load_router
from anyshape.search.algorithms import search
from anyshape.search.budget import Budget
from anyshape.search.objectives import Quality, cost_functions
from anyshape.train.loop import train
from anyshape.train.run import iterate_metrics
from anyshape.train.settings import TrainSettings

sys.path.insert(0, str(Path(__file__).parent))
from train import DATA, sorted_model  # noqa: E402  (the sorted parent bench/train.py makes)

FRACTIONS = tuple(i / 16 for i in range(2, 17))
TRAINED, INTERPOLATED = (0.5, 0.25), (0.375, 0.625)
SEARCH_GOAL = 1.03  # router loss / search loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/router"), help="work folder")
    parser.add_argument("--scores", type=Path, default=Path("bench/results/family/stages/scores.safetensors"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--router-lr", type=float, default=TrainSettings.router_lr)
    parser.add_argument("--budget-weight", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed, help="the run's: start, samples, batch order")
    parser.add_argument("--test-tokens", type=int, default=16384, help="of the test protocol's tokens")
    parser.add_argument("--search-trials", type=int, default=24)
    parser.add_argument("--joint", action="store_true", help="train the model with the router, not frozen")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="2 steps, 4,096 test tokens, 2 search trials")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.test_tokens, args.search_trials = 2, 4096, 2
    started = time.perf_counter()

    sorted_parent = sorted_model(args.out.parent / "train" / "sorted", args.scores)
    settings = TrainSettings(
        model=str(sorted_parent), data=str(DATA / "wiki.valid.tokens"), out=str(args.out / "run"),
        router=True, router_only=not args.joint, anchors=(0.25, 0.5, 0.75, 1.0), fractions=FRACTIONS, kd="forward-kl",
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, router_lr=args.router_lr,
        budget_weight=args.budget_weight, seed=args.seed, warmup_steps=max(1, args.steps // 10), save_every=args.steps,
        eval_every=args.steps, val_batches=1,
    )  # fmt: skip
    if not (args.out / "run" / "checkpoint").is_dir():
        train(settings, overwrite=True, progress=True, log=print, controller=RouterControl)
    router = load_router(args.out / "run")
    parent = anyshape.load(args.out / "run" if args.joint else sorted_parent)  # the weights the router chose for
    config = parent.config
    tokenizer = anyshape.load_tokenizer(sorted_parent)
    test_ids = tokenize(tokenizer, wikitext_text(DATA / "wiki.test.raw"), min(args.test_tokens, MAX_TOKENS))

    def loss(shape) -> float:
        return math.log(perplexity(parent, test_ids, shape, progress=True).perplexity)

    ranking = [i for n in sorted(router.space.layer_sets) for i in router.space.layer_sets[n]]
    ranking = list(dict.fromkeys(ranking))  # layers in the order depth selection adds them

    settings_record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict = {"settings": settings_record, "budgets": {}}
    calibration = calibration_ids(tokenizer, read_text(DATA / "wiki.valid.tokens"), 16, 256)
    quality = Quality(parent, calibration)
    for fraction in (*TRAINED, *INTERPOLATED):
        budget = Budget(fraction)
        route = router.route(budget)
        row = {"budget_parameters": route.budget_parameters, "router": _entry(route.shape, config, loss)}
        row["router"]["met_budget_by_itself"] = route.meets_budget
        if fraction in TRAINED:
            for name, shape in single_axis_shapes(config, budget.parameters(config), True, ranking).items():
                row[name] = _entry(shape, config, loss) if shape is not None else None
        else:
            found = search(
                router.space, quality, cost_functions(parent), algorithm="random", trials=args.search_trials,
                bounds={"params": (0.9 * budget.parameters(config), budget.parameters(config))}, progress=True,
            ).best()  # fmt: skip
            row["search"] = _entry(found.shape, config, loss)
        results["budgets"][f"{fraction:g}"] = row
        print(json.dumps({f"{fraction:g}": row}))

    results["router_training"] = [m for m in iterate_metrics(args.out / "run") if "router" in m][-1:]
    results["seconds"] = time.perf_counter() - started
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def _entry(shape, config, loss) -> dict:
    return {
        "shape": describe(shape.to_dict()),
        "num_parameters": shape.num_parameters(config),
        "loss": loss(shape),
    }


def markdown(results: dict) -> str:
    lines = [
        "| budget | router | MLP-only | hidden-only | depth-only | search | router beats heuristics / within 3% |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(entry: dict | None) -> str:
        if entry is None:
            return "unreachable"
        return f"{entry['loss']:.3f} ({entry['shape']}, {entry['num_parameters'] / 1e6:.1f}M)"

    for fraction, row in results["budgets"].items():
        router = row["router"]["loss"]
        if "search" in row:
            ratio = router / row["search"]["loss"]
            verdict = f"{ratio:.3f} ({'met' if ratio <= SEARCH_GOAL else 'missed'})"
        else:
            beaten = all(row[name] is None or router < row[name]["loss"] for name in HEURISTICS)
            verdict = "yes" if beaten else "no"
        lines.append(
            f"| {float(fraction):.1%} | {cell(row['router'])} | "
            + " | ".join(cell(row.get(name)) if name in row else "" for name in (*HEURISTICS, "search"))
            + f" | {verdict} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
