"""One-for-all elastic training vs training each Shape alone, on SmolLM2-135M and WikiText-2.

    .venv/bin/python bench/train.py                  # the defaults below, on this machine
    .venv/bin/python bench/train.py --quick          # a smoke run: 2 steps, 4,096 test tokens

1. The parent is SmolLM2 sorted by importance (the scores compress left in
   bench/results/family/stages/, or fresh ones), so every width is a prefix of its best units.
2. Two Shapes, at about 50% and 70% of the non-embedding parameters, mixing every axis:
   L22 H512 Q9/G3 F1152 and L26 H576 Q9/G3 F1152 (depth keeps the best-ranked layers).
3. Perplexity on the WikiText-2 test protocol (../shared/data/wikitext-2/README.md) of each
   Shape: zero-shot (the sorted parent's slice); after one-for-all training (`anyshape train`,
   sampling fixed: the largest Shape and both, in-place KD with forward KL, full fine-tuning;
   forward KL's gradient has the next-token loss's scale, where cosine's is far smaller and
   learns little in a short run); and after training the Shape alone (its extracted model, next-token loss).
   Every Shape sees the same tokens in both: steps x batch x seq_len of wiki.valid.tokens (the
   shared data has no training split; 5% of its windows are held out for the run's own checks).
4. Tokens/s of each Shape's forward + backward in the one-for-all run, relative to the largest.
Goal: one-for-all within 5% of per-Shape training at both sizes (ratio <= 1.05).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import anyshape
from anyshape import Shape
from anyshape.compress.report import describe
from anyshape.data.text import wikitext_text
from anyshape.evaluate.perplexity import MAX_TOKENS, perplexity, tokenize
from anyshape.importance.permute import sort_
from anyshape.importance.scores import SCORES_FILENAME, Scores, score
from anyshape.train.loop import train
from anyshape.train.run import iterate_metrics
from anyshape.train.settings import TrainSettings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
SHAPES = {"50%": (22, 512, 9, 3, 1152), "70%": (26, 576, 9, 3, 1152)}  # layers, H, heads, KV groups, F
GOAL = 1.05  # one-for-all perplexity / per-Shape perplexity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/train"), help="work folder")
    parser.add_argument("--scores", type=Path, default=Path("bench/results/family/stages/scores.safetensors"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kd", default="forward-kl", help="in-place distillation loss of the one-for-all run")
    parser.add_argument("--test-tokens", type=int, default=32768, help="of the test protocol's tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="2 steps, 4,096 test tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.test_tokens = 2, 4096
    started = time.perf_counter()

    sorted_parent = sorted_model(args.out / "sorted", args.scores)
    parent = anyshape.load(sorted_parent)
    tokenizer = anyshape.load_tokenizer(sorted_parent)
    test_ids = tokenize(tokenizer, wikitext_text(DATA / "wiki.test.raw"), min(args.test_tokens, MAX_TOKENS))
    ranking = Scores.load(sorted_parent / SCORES_FILENAME, parent.config).layers.argsort(descending=True).tolist()
    shapes = {
        name: Shape(tuple(sorted(ranking[:depth])), hidden, heads, groups, mlp)
        for name, (depth, hidden, heads, groups, mlp) in SHAPES.items()
    }

    def ppl(model, shape=None) -> float:
        return perplexity(model.to(args.device), test_ids, shape, progress=True).perplexity

    base = TrainSettings(
        model=str(sorted_parent), data=str(DATA / "wiki.valid.tokens"),
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, kd=args.kd,
        warmup_steps=max(1, args.steps // 10), save_every=args.steps, eval_every=args.steps, val_batches=2,
    )  # fmt: skip
    results: dict = {"settings": base.to_dict(), "tokens_per_shape": args.steps * args.batch_size * args.seq_len}
    full_params = Shape.full(parent.config).num_parameters(parent.config, embeddings=False)
    rows = {
        name: {
            "shape": describe(shape.to_dict()),
            "fraction": shape.num_parameters(parent.config, embeddings=False) / full_params,
            "zero_shot": ppl(parent, shape),
        }
        for name, shape in shapes.items()
    }
    results["dense"] = ppl(parent)

    one_for_all = replace(base, out=str(args.out / "one-for-all"), sampling="fixed",
                          shapes=tuple(s.to_dict() for s in shapes.values()))  # fmt: skip
    train(one_for_all, overwrite=True, progress=True, log=print)
    trained = anyshape.load(one_for_all.out)
    results["dense_after"] = ppl(trained)
    steps = [m for m in iterate_metrics(Path(one_for_all.out)) if "tokens_per_s" in m][1:]  # first: warm-up
    speed = {slot: statistics.median(m["tokens_per_s"][slot] for m in steps) for slot in steps[0]["tokens_per_s"]}
    for i, (name, shape) in enumerate(shapes.items()):
        rows[name]["one_for_all"] = ppl(trained, shape)
        rows[name]["tokens_per_s_vs_largest"] = speed[f"fixed-{i}"] / speed["largest"]
    del trained

    for name, shape in shapes.items():
        folder = args.out / f"alone-{name.rstrip('%')}"
        anyshape.export_hf(parent, shape, folder / "model", tokenizer=tokenizer, overwrite=True)
        alone = replace(base, model=str(folder / "model"), out=str(folder / "run"), fractions=(1.0,), random_shapes=0)
        train(alone, overwrite=True, progress=True, log=print)  # the Shape is the whole model: next-token loss
        rows[name]["alone"] = ppl(anyshape.load(alone.out))
        rows[name]["ratio"] = rows[name]["one_for_all"] / rows[name]["alone"]

    results["rows"], results["seconds"] = rows, round(time.perf_counter() - started)
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def sorted_model(folder: Path, scores_path: Path) -> Path:
    """SmolLM2 sorted by importance, with its scores beside it (made once)."""
    if (folder / SCORES_FILENAME).is_file():
        return folder
    parent = anyshape.load("smollm2-135m")
    tokenizer = anyshape.load_tokenizer("smollm2-135m")
    if scores_path.is_file():
        scores = Scores.load(scores_path, parent.config)
    else:
        from anyshape.data.calibration import calibration_ids
        from anyshape.data.text import read_text

        scores = score(parent, calibration_ids(tokenizer, read_text(DATA / "wiki.valid.tokens"), 16, 512))
    sorted_scores = sort_(parent, scores)
    anyshape.export_hf(parent, parent.full_shape, folder, tokenizer=tokenizer, overwrite=True)
    sorted_scores.save(folder / SCORES_FILENAME)
    return folder


def markdown(results: dict) -> str:
    lines = [
        f"Dense perplexity {results['dense']:.2f} (after one-for-all training: {results['dense_after']:.2f}); "
        f"{results['tokens_per_shape']:,} training tokens per Shape.",
        "",
        "| size | Shape | non-embedding fraction | zero-shot | one-for-all | alone | one-for-all / alone | "
        "tokens/s vs largest |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results["rows"].items():
        lines.append(
            f"| {name} | {r['shape']} | {r['fraction']:.3f} | {r['zero_shot']:,.1f} | {r['one_for_all']:,.2f} | "
            f"{r['alone']:,.2f} | {r['ratio']:.3f} | {r['tokens_per_s_vs_largest']:.2f} |"
        )
    met = all(r["ratio"] <= GOAL for r in results["rows"].values())
    lines += ["", f"Goal: one-for-all / alone <= {GOAL} at both sizes: {'met' if met else 'missed'}.",
              f"total {results['seconds']} s"]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
