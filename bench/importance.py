"""Importance sorting and depth selection on the embedded SmolLM2-135M, WikiText-2 protocol.

    .venv/bin/python bench/importance.py           # full run (about 45 minutes on 2 cores)
    .venv/bin/python bench/importance.py --quick   # smoke run: 4 test windows, tiny calibration

Perplexity follows the project's WikiText-2 protocol (../shared/data/wikitext-2/README.md): the
raw test split read the Hugging Face way, 64 disjoint windows of 512 tokens, 32,704 scored
tokens, fp32. Calibration windows come from the validation split (wiki.valid.tokens) at
offsets drawn with seed 0.

Sub-networks at about 50% and 75% of the non-embedding parameters, no training, each reported
as perplexity and its ratio to the dense model's, measured in the same run:

    width (MLP only: the intermediate_size whose parameter fraction is closest to the target)
        random      every layer's neurons randomly permuted (seed 0), then the same prefix
        unsorted    the prefix of the parent's own neuron order
        magnitude   sorted by weight norm
        activation  sorted by activation scores from 128 x 512 calibration tokens, with the
                    aggregation pair (agg_B, agg_S) whose sorted Shapes have the lowest
                    perplexity on held-out calibration windows (seed 1); one activation pass
                    records all nine pairs
    depth (full width: the number of layers whose parameter fraction is closest to the target)
        bi          the layers with the highest Block Importance (from the activation pass)
        drop        ShortGPT-style: remove the lowest-BI layer, re-measure, repeat
        dp          AmoebaLLM's dynamic programme, one run for every depth
    drop and dp judge layer sets on a smaller calibration (4 x 256 tokens by default), because
    the DP runs the model several hundred times.

Timings: the activation pass on the 128 x 512 scoring calibration (the cost of
`score(metric="activation")`), and the DP's number of evaluations and wall time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from torch import Tensor

import anyshape
from anyshape import ElasticLlama, Shape
from anyshape.data.calibration import calibration_ids
from anyshape.data.text import read_text, wikitext_text
from anyshape.evaluate.perplexity import perplexity, tokenize
from anyshape.importance.activations import AGGREGATIONS, ActivationRecord, record_activations
from anyshape.importance.layers import select_layers
from anyshape.importance.permute import Permutation, permute_, sort_
from anyshape.importance.scores import Scores, magnitude_scores
from anyshape.model.nll import mean_nll

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
TARGETS = (0.50, 0.75)  # fractions of the non-embedding parameters
SEED = 0
WINDOW = 512  # tokens per test window
QUICK = {"test_windows": 4, "score_calibration": (8, 128), "held_out": (2, 128), "depth_calibration": (2, 64)}
REFERENCE = "dense 29.9; activation-sorted MLP 512 (50%) about 530; the 15 highest-BI layers (50%) about 14,500"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def windows_arg(text: str) -> tuple[int, int]:
    """'128x512' -> (128, 512): calibration windows x tokens per window."""
    count, length = text.lower().split("x")
    return int(count), int(length)


class Log:
    """Prints progress lines stamped with the seconds since the start."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:5.0f}s] {message}", flush=True)


# ---------------------------------------------------------------------------- Shapes


def fraction(shape: Shape, model: ElasticLlama) -> float:
    """Non-embedding parameters of `shape` over the full model's."""
    c = model.config
    return shape.num_parameters(c, embeddings=False) / model.full_shape.num_parameters(c, embeddings=False)


def mlp_shape(model: ElasticLlama, target: float) -> Shape:
    """The full model but the MLP, whose width gives the fraction closest to `target`."""
    candidates = [replace(model.full_shape, intermediate_size=f) for f in range(1, model.config.intermediate_size + 1)]
    return min(candidates, key=lambda shape: abs(fraction(shape, model) - target))


def depth_for(model: ElasticLlama, target: float) -> int:
    """The number of full-width layers whose fraction is closest to `target`."""
    counts = range(1, model.config.num_hidden_layers + 1)
    return min(counts, key=lambda k: abs(fraction(replace(model.full_shape, layers=tuple(range(k))), model) - target))


def describe(shape: Shape, model: ElasticLlama) -> str:
    """'full', 'MLP 512' or '15 layers'."""
    if shape == model.full_shape:
        return "full"
    if shape.layers != model.full_shape.layers:
        return f"{len(shape.layers)} layers"
    return f"MLP {shape.intermediate_size}"


# ---------------------------------------------------------------------------- scores and orders


def activation_scores(record: ActivationRecord, agg_batch: str, agg_seq: str) -> Scores:
    """The Scores `score(metric="activation")` returns, from an already recorded pass."""
    units = record.scores(agg_batch, agg_seq)
    info = {"metric": "activation", "agg_batch": agg_batch, "agg_seq": agg_seq, "layer_metric": "bi"}
    return Scores(units["neurons"], units["heads"], units["kv_groups"], units["channels"], units["bi"], info)


def random_neuron_order(model: ElasticLlama, seed: int) -> Permutation:
    """Every layer's MLP neurons in random order; heads, groups and channels unchanged."""
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    L, G, q = c.num_hidden_layers, c.num_key_value_heads, c.queries_per_group
    return Permutation(
        channels=torch.arange(c.hidden_size),
        neurons=torch.stack([torch.randperm(c.intermediate_size, generator=generator) for _ in range(L)]),
        kv_groups=torch.arange(G).repeat(L, 1),
        heads=torch.arange(q).repeat(L, G, 1),
    )


class Weights:
    """The parent's weights, kept aside so each method starts from them."""

    def __init__(self, model: ElasticLlama):
        self.model = model
        self.original = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def restore(self) -> None:
        self.model.load_state_dict(self.original)


# ---------------------------------------------------------------------------- the benchmark


def choose_pair(
    model: ElasticLlama, weights: Weights, record: ActivationRecord, held_out: Tensor, shapes: list[Shape], log: Log
) -> tuple[dict, list[dict]]:
    """Sorts by each (agg_B, agg_S) pair and measures `shapes` on held_out (N, S); the best pair
    has the lowest geometric mean of their perplexities."""
    rows = []
    for agg_batch, agg_seq in itertools.product(AGGREGATIONS, repeat=2):
        weights.restore()
        sort_(model, activation_scores(record, agg_batch, agg_seq))
        nll = [mean_nll(model, held_out, shape) for shape in shapes]
        rows.append(
            {
                "agg_batch": agg_batch,
                "agg_seq": agg_seq,
                "perplexity": [math.exp(x) for x in nll],
                "geometric_mean": math.exp(sum(nll) / len(nll)),
            }
        )
        measured = ", ".join(f"{p:,.1f}" for p in rows[-1]["perplexity"])
        log(f"pair {agg_batch}/{agg_seq}: held-out perplexity {measured}")
    return min(rows, key=lambda row: row["geometric_mean"]), rows


def run(args: argparse.Namespace, log: Log) -> dict:
    """Every measurement, as one JSON-ready record."""
    model = anyshape.load("smollm2-135m").eval()
    tokenizer = anyshape.load_tokenizer("smollm2-135m")
    test_ids = tokenize(tokenizer, wikitext_text(DATA / "wiki.test.raw"))[: args.test_windows * WINDOW]
    valid_text = read_text(DATA / "wiki.valid.tokens")
    score_ids = calibration_ids(tokenizer, valid_text, *args.score_calibration, seed=SEED)
    held_out = calibration_ids(tokenizer, valid_text, *args.held_out, seed=SEED + 1)
    depth_ids = calibration_ids(tokenizer, valid_text, *args.depth_calibration, seed=SEED)
    log(f"loaded SmolLM2-135M and {len(test_ids):,} test tokens")
    weights = Weights(model)
    rows: list[dict] = []

    def measure(method: str, target: float, shape: Shape) -> None:
        value = perplexity(model, test_ids, shape).perplexity
        rows.append(
            {
                "method": method,
                "target": target,
                "shape": describe(shape, model),
                "fraction": fraction(shape, model),
                "layers": list(shape.layers),
                "perplexity": value,
            }
        )
        log(f"{method}, {describe(shape, model)}: perplexity {value:,.1f}")

    measure("dense", 1.0, model.full_shape)

    started = time.perf_counter()
    record = record_activations(model, score_ids, progress=True)
    scoring_seconds = time.perf_counter() - started
    log(f"activation pass on {len(score_ids)} x {score_ids.shape[1]} tokens: {scoring_seconds:.0f}s")

    # Width: the same MLP prefixes of four neuron orders.
    widths = {target: mlp_shape(model, target) for target in TARGETS}
    for target, shape in widths.items():
        measure("unsorted", target, shape)
    permute_(model, random_neuron_order(model, SEED))
    for target, shape in widths.items():
        measure("random", target, shape)
    weights.restore()
    sort_(model, Scores(**magnitude_scores(model), layers=record.bi, info={"metric": "magnitude"}))
    for target, shape in widths.items():
        measure("magnitude", target, shape)
    best, pairs = choose_pair(model, weights, record, held_out, list(widths.values()), log)
    log(f"best pair on held-out calibration: agg_B {best['agg_batch']}, agg_S {best['agg_seq']}")
    weights.restore()
    sort_(model, activation_scores(record, best["agg_batch"], best["agg_seq"]))
    for target, shape in widths.items():
        measure("activation", target, shape)

    # Depth: full width, the layers each method keeps.
    weights.restore()
    dp = select_layers(model, depth_ids, "dp", progress=True)
    log(f"dp: {dp.evaluations} evaluations in {dp.seconds:.0f}s, every depth 1..{model.config.num_hidden_layers}")
    for target in TARGETS:
        keep = depth_for(model, target)
        kept = {
            "bi": select_layers(model, depth_ids, "bi", keep, layer_scores=record.bi).layers[keep],
            "drop": select_layers(model, depth_ids, "drop", keep).layers[keep],
            "dp": dp.layers[keep],
        }
        for method, layers in kept.items():
            measure(method, target, replace(model.full_shape, layers=layers))

    return {
        "rows": rows,
        "pairs": pairs,
        "best_pair": {"agg_batch": best["agg_batch"], "agg_seq": best["agg_seq"]},
        "scoring": {"sequences": list(score_ids.shape), "seconds": scoring_seconds},
        "dp": {"sequences": list(depth_ids.shape), "evaluations": dp.evaluations, "seconds": dp.seconds},
        "held_out": list(held_out.shape),
        "test_tokens": len(test_ids),
    }


# ---------------------------------------------------------------------------- report

METHODS = {
    "dense": "dense",
    "random": "width: random neuron order",
    "unsorted": "width: unsorted prefix",
    "magnitude": "width: magnitude-sorted",
    "activation": "width: activation-sorted",
    "bi": "depth: highest BI",
    "drop": "depth: BI drop (ShortGPT)",
    "dp": "depth: DP (AmoebaLLM)",
}


def markdown(result: dict) -> str:
    rows = result["rows"]
    dense = rows[0]["perplexity"]
    lines = [
        "| method | kept | non-embedding params | PPL | PPL / dense |",
        "|---|---|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r["method"] != "dense", r["target"], list(METHODS).index(r["method"]))):
        lines.append(
            f"| {METHODS[row['method']]} | {row['shape']} | {row['fraction']:.1%} | {row['perplexity']:,.1f} | "
            f"{row['perplexity'] / dense:,.2f} |"
        )
    pair, scoring, dp = result["best_pair"], result["scoring"], result["dp"]
    held_out = " x ".join(map(str, result["held_out"]))
    lines += [
        "",
        f"Activation aggregation pairs, sorted models on {held_out} held-out calibration tokens "
        f"(best: agg_B {pair['agg_batch']}, agg_S {pair['agg_seq']}):",
        "",
        "| agg_B | agg_S | " + " | ".join(f"PPL at ~{t:.0%}" for t in TARGETS) + " |",
        "|---|---|" + "---:|" * len(TARGETS),
    ]
    for row in result["pairs"]:
        measured = " | ".join(f"{p:,.1f}" for p in row["perplexity"])
        lines.append(f"| {row['agg_batch']} | {row['agg_seq']} | {measured} |")
    lines += [
        "",
        "| timing | calibration tokens | result |",
        "|---|---|---:|",
        f"| activation pass (all nine pairs) | {scoring['sequences'][0]} x {scoring['sequences'][1]} "
        f"| {scoring['seconds']:.0f} s |",
        f"| DP, every depth | {dp['sequences'][0]} x {dp['sequences'][1]} "
        f"| {dp['evaluations']} evaluations, {dp['seconds']:.0f} s |",
        "",
        "Kept layers:",
        "",
    ]
    for row in rows:
        if row["method"] in ("bi", "drop", "dp"):
            lines.append(f"- {METHODS[row['method']]}, {row['shape']}: {row['layers']}")
    lines += ["", f"Reference on this protocol: {REFERENCE}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: " + ", ".join(f"{k} {v}" for k, v in QUICK.items())
    )
    parser.add_argument(
        "--test-windows", type=int, default=64, help="512-token test windows (default 64: the protocol)"
    )
    parser.add_argument(
        "--score-calibration",
        type=windows_arg,
        default=(128, 512),
        metavar="NxS",
        help="activation scoring windows x tokens (default 128x512)",
    )
    parser.add_argument(
        "--held-out",
        type=windows_arg,
        default=(8, 512),
        metavar="NxS",
        help="windows that choose the aggregation pair (default 8x512)",
    )
    parser.add_argument(
        "--depth-calibration",
        type=windows_arg,
        default=(4, 256),
        metavar="NxS",
        help="windows that judge layer sets in drop and dp (default 4x256)",
    )
    parser.add_argument("--threads", type=int, default=cores(), help="torch threads (default: the cores)")
    parser.add_argument("--json", type=Path, help="also write the results here (e.g. bench/results/importance.json)")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)

    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}, "
        f"{platform.processor() or platform.machine()}, {cores()} cores, torch threads {torch.get_num_threads()}, "
        f"load average {load_average()}",
        flush=True,
    )
    log = Log()
    result = run(args, log)
    log(f"done; load average {load_average()}")
    print()
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result | {"threads": args.threads, "args": sys.argv[1:]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
