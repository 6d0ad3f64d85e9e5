"""Deploy and judge a SmolLM2-135M family at 25/50/75/100% of its non-embedding parameters.

    .venv/bin/python bench/deploy.py                      # everything, on this machine
    .venv/bin/python bench/deploy.py --quick              # a smoke run: tiny limits, 1 repeat
    # quality on a GPU machine given the family's summary.json and stages/scores.safetensors,
    # then speed here, with the quality numbers from there:
    python bench/deploy.py --parts quality --device cuda --family F --json quality.json
    .venv/bin/python bench/deploy.py --parts speed --quality-json quality.json

1. family: `compress` with budgets 25/50/75% of the non-embedding parameters, calibrated on
   ../shared/data/wikitext-2/wiki.valid.tokens, as bench/compress.py (reused when present).
2. quality, for the parent and each member: perplexity on the WikiText-2 test protocol
   (../shared/data/wikitext-2/README.md), and lm-eval accuracy on the local hellaswag, lambada
   and boolq tasks (../shared/data/eval, `--limit` documents each). A member whose folder is
   absent (a machine given only summary.json and the scores) is rebuilt from the parent: sorted
   by the family's scores, sliced, and compensated as compress did.
3. speed, for each: decode tokens/s (batch 1, KV cache, median of repeats) in llama.cpp on the
   q8_0 GGUF and in anyshape, and the q8_0 file size.
Goal: in llama.cpp, each member's decode speed-up over the parent within 20% of the inverse of
its parameter ratio (total parameters, the tied LM head counted once: what a decode step reads).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import anyshape
from anyshape import ElasticLlama, Shape
from anyshape.compress.compensate import compensate
from anyshape.compress.pipeline import CompressSettings, compress
from anyshape.compress.report import describe
from anyshape.data.calibration import random_windows
from anyshape.data.text import read_text, wikitext_text
from anyshape.evaluate.harness import evaluate_tasks
from anyshape.evaluate.perplexity import MAX_TOKENS, perplexity, tokenize
from anyshape.export.extract import extract_model
from anyshape.importance.permute import sort_
from anyshape.importance.scores import Scores

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = ("hellaswag_local", "lambada_openai_local", "boolq_local")
BUDGETS = (0.25, 0.5, 0.75)  # of the non-embedding parameters
SPEED_GOAL = 0.2  # |speed-up / inverse parameter ratio - 1| at most this, in llama.cpp


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="the parent (a name, .gguf or HF folder)")
    parser.add_argument("--family", type=Path, default=Path("bench/results/deploy-family"), help="family folder")
    parser.add_argument("--parts", default="family,quality,speed", help="comma-separated: family, quality, speed")
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared data folder (wikitext-2/, eval/)")
    parser.add_argument("--device", default="cpu", help="where quality is measured (cpu, cuda)")
    parser.add_argument("--limit", type=int, default=1000, help="documents per task")
    parser.add_argument("--repeats", type=int, default=3, help="speed repeats (after one warm-up)")
    parser.add_argument("--quality-json", type=Path, help="take quality from this earlier run's JSON")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--plot", type=Path, help="also plot them here (PNG)")
    parser.add_argument("--quick", action="store_true", help="limit 20, 4,096 test tokens, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit, args.repeats = 20, 1
    parts = set(args.parts.split(","))
    started = time.perf_counter()
    # Quality is measured in float32 everywhere: no TF32 on GPUs, so numbers match the CPU's.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    settings = CompressSettings(
        budgets=BUDGETS, budget_basis="non-embedding", data=str(args.data / "wikitext-2" / "wiki.valid.tokens"),
        num_sequences=16, trials=4 if args.quick else 24,
        train_tokens=0,  # the zero-shot family: a member absent here is rebuilt from the parent alone
    )  # fmt: skip
    if args.quality_json or "family" not in parts:  # a family made earlier, maybe elsewhere
        summary = json.loads((args.family / "summary.json").read_text())
    else:  # made, or reused when up to date (finished stages are reused in any case)
        print(f"compress: {settings}", flush=True)
        summary = compress(args.model, args.family, settings, overwrite=True, log=lambda m: print(m, flush=True))
    config = anyshape.load_config(args.model)
    rows = [{"name": "parent", "shape": Shape.full(config).to_dict(), "compensated": False}]
    rows += [{"name": m["folder"], "shape": m["shape"], "compensated": m["compensated"]} for m in summary["members"]]
    for row in rows:
        shape = Shape.from_dict(row["shape"], config)
        row["params"] = shape.num_parameters(config)
        row["params_non_embedding"] = shape.num_parameters(config, embeddings=False)

    if args.quality_json:
        quality = {r["name"]: r for r in json.loads(args.quality_json.read_text())["rows"]}
        for row in rows:
            row.update({k: v for k, v in quality[row["name"]].items() if k in ("ppl", "tasks", "quality_device")})
    elif "quality" in parts:
        measure_quality(args, summary, settings, rows)
    if "speed" in parts:
        measure_speed(args, rows)
    results = {"rows": rows, "limit": args.limit, "seconds": round(time.perf_counter() - started)}
    print(markdown(results), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 0


def measure_quality(args: argparse.Namespace, summary: dict[str, Any], settings: CompressSettings, rows: list) -> None:
    """Adds each row's WikiText-2 perplexity and task scores, measured on `args.device`."""
    tokenizer = anyshape.load_tokenizer(args.model)
    test_text = wikitext_text(args.data / "wikitext-2" / "wiki.test.raw")
    test_ids = tokenize(tokenizer, test_text, 4096 if args.quick else MAX_TOKENS)
    parent = anyshape.load(args.model)
    sort_(parent, Scores.load(args.family / "stages" / "scores.safetensors", parent.config))
    include_path = args.data / "eval" / "lm_eval_tasks"
    for row in rows:
        model = member_model(args.family, row, parent, tokenizer, settings).to(args.device)
        shape = model.full_shape
        row["ppl"] = perplexity(model, test_ids, shape, progress=True).perplexity
        print(f"{row['name']}: perplexity {row['ppl']:.2f}", flush=True)
        tasks = evaluate_tasks(model, tokenizer, shape, TASKS, include_path, args.limit)
        row["tasks"] = [vars(score) for score in tasks.scores]
        row["quality_device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        print(f"{row['name']}: {row['tasks']}", flush=True)
        model.to("cpu")
        if args.json:  # what is measured so far survives an interrupted run
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"rows": rows, "limit": args.limit}, indent=1))


def member_model(family: Path, row: dict, parent: ElasticLlama, tokenizer, settings: CompressSettings) -> ElasticLlama:
    """The member as exported, or rebuilt from the sorted parent where its folder is absent."""
    if row["name"] == "parent":
        return parent
    if (family / row["name"] / "config.json").is_file():
        return anyshape.load(family / row["name"])
    shape = Shape.from_dict(row["shape"], parent.config)
    if not row["compensated"]:
        return extract_model(parent, shape)
    return compensate(parent, shape, fit_windows(tokenizer, settings), ridge=settings.ridge, progress=True)


def fit_windows(tokenizer, settings: CompressSettings) -> torch.Tensor:
    """The windows compress fitted compensation on (the same split and seed)."""
    ids = torch.tensor(tokenizer(read_text(settings.data), add_special_tokens=False)["input_ids"])
    middle = settings.eval_tokens + (len(ids) - settings.eval_tokens) // 2
    return random_windows(ids[settings.eval_tokens : middle], settings.num_sequences, settings.sequence_length,
                          settings.seed)  # fmt: skip


def measure_speed(args: argparse.Namespace, rows: list) -> None:
    """Adds decode tokens/s in llama.cpp (q8_0) and anyshape, and the q8_0 GGUF's size."""
    from anyshape.deploy.speed import SpeedSettings, benchmark  # only here: quality runs without them
    from anyshape.export.gguf import export_gguf

    speed = SpeedSettings(prompt_tokens=128, gen_tokens=32 if args.quick else 128, repeats=args.repeats)
    parent = anyshape.load(args.model)
    tokenizer = anyshape.load_tokenizer(args.model)
    with tempfile.TemporaryDirectory(prefix="anyshape-deploy-") as tmp:
        for row in rows:
            shape = Shape.from_dict(row["shape"], parent.config)
            gguf = export_gguf(parent, shape, Path(tmp) / f"{row['name']}.gguf", tokenizer, outtype="q8_0")
            row["gguf_q8_0_bytes"] = gguf.stat().st_size
            gguf.unlink()
            results, skipped = benchmark(args.model, shape, speed, ("anyshape", "llama.cpp"), label=row["name"])
            row["decode"] = {r.runtime: r.decode.median for r in results}
            row["prefill"] = {r.runtime: r.prefill.median for r in results}
            for s in skipped:
                print(f"{row['name']}: {s.runtime} skipped: {s.reason}", flush=True)
            print(f"{row['name']}: decode tok/s {row['decode']}", flush=True)


def _score(row: dict, task: str, metric: str) -> str:
    for score in row.get("tasks", []):
        if score["task"] == task and score["metric"] == metric:
            return f"{100 * score['value']:.1f} ± {100 * score['stderr']:.1f}"
    return ""


def markdown(results: dict) -> str:
    rows = results["rows"]
    parent = rows[0]
    lines = [
        f"Tasks: {results['limit']} documents each (accuracy %, ± standard error).",
        "",
        "| model | Shape | params | param ratio | q8_0 GGUF (MiB) | WikiText-2 PPL | hellaswag acc_norm | "
        "lambada acc | boolq acc | llama.cpp decode tok/s | speed-up | 1 / param ratio | anyshape decode tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for row in rows:
        ratio = row["params"] / parent["params"]
        decode = row.get("decode", {})
        cpp, base = decode.get("llama.cpp"), parent.get("decode", {}).get("llama.cpp")
        speedup = cpp / base if cpp and base else None
        size = row.get("gguf_q8_0_bytes")
        lines.append(
            f"| {row['name']} | {describe(row['shape'])} | {row['params'] / 1e6:.1f}M | {ratio:.3f} | "
            f"{'' if size is None else f'{size / 2**20:.0f}'} | {row.get('ppl', math.nan):.1f} | "
            f"{_score(row, 'hellaswag_local', 'acc_norm')} | {_score(row, 'lambada_openai_local', 'acc')} | "
            f"{_score(row, 'boolq_local', 'acc')} | {'' if cpp is None else f'{cpp:.1f}'} | "
            f"{'' if speedup is None else f'{speedup:.2f}'} | {1 / ratio:.2f} | "
            f"{decode.get('anyshape', math.nan):.1f} |"
        )
        if speedup is not None and row is not parent:
            off = speedup * ratio - 1
            verdicts.append(
                f"{row['name']}: speed-up {speedup:.2f} vs 1/ratio {1 / ratio:.2f}: {off:+.0%} "
                f"(goal within {SPEED_GOAL:.0%}: {'met' if abs(off) <= SPEED_GOAL else 'MISSED'})"
            )
    return "\n".join([*lines, "", *verdicts, f"\ntotal {results['seconds']} s"])


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy, perplexity and llama.cpp decode speed against parameters, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda row: row["params"])
    params = [row["params"] / 1e6 for row in rows]
    figure, (accuracy, ppl, speed) = plt.subplots(1, 3, figsize=(13, 3.8))
    for task, metric in (("hellaswag_local", "acc_norm"), ("lambada_openai_local", "acc"), ("boolq_local", "acc")):
        values = [next((100 * s["value"] for s in r.get("tasks", []) if (s["task"], s["metric"]) == (task, metric)),
                       math.nan) for r in rows]  # fmt: skip
        accuracy.plot(params, values, "o-", label=f"{task.removesuffix('_local')} {metric}")
    accuracy.set(xlabel="parameters (M)", ylabel="accuracy (%)", title="zero-shot accuracy")
    accuracy.legend(fontsize=8)
    ppl.plot(params, [row.get("ppl", math.nan) for row in rows], "o-")
    ppl.set(xlabel="parameters (M)", ylabel="perplexity", yscale="log", title="WikiText-2 perplexity")
    for runtime in ("llama.cpp", "anyshape"):
        speed.plot(params, [row.get("decode", {}).get(runtime, math.nan) for row in rows], "o-", label=runtime)
    speed.set(xlabel="parameters (M)", ylabel="tokens/s", title="decode, batch 1")
    speed.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
