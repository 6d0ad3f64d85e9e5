"""Targeted structured pruning vs importance-sorted extraction, at equal tokens (Sheared LLaMA
on SmolLM2-135M), with dynamic batch loading over three domains.

    .venv/bin/python bench/prune.py                  # the defaults below, on this machine
    .venv/bin/python bench/prune.py --quick          # a smoke run: 2 + 2 steps, 4,096 test tokens

1. The parent is SmolLM2 sorted by importance (as in bench/train.py).
2. Target: L22 H512 Q9/G3 F1024, 49% of the non-embedding parameters.
3. Three domains, each a text file written once: wiki (wiki.valid.tokens), code (the Python
   standard library's source, this interpreter's), docs (the standard library's docstrings).
   Reference losses: the parent's held-out loss on each domain.
4. Targeted: `anyshape prune` for --prune-steps, then `anyshape train OUT/model --continue` for
   --continue-steps, both with --dynamic-batch. Sorted: the same target Shape cut from the sorted
   parent (its best units by importance), then --prune-steps + --continue-steps of the same
   continued training. Both see the same number of tokens.
5. WikiText-2 test-protocol perplexity of both, zero-shot (before continued training) and after;
   the domain weights over time.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import anyshape
from anyshape.data.text import wikitext_text
from anyshape.evaluate.perplexity import MAX_TOKENS, perplexity, tokenize
from anyshape.importance.scores import SCORES_FILENAME, Scores
from anyshape.prune.pipeline import MODEL, RUN, prune
from anyshape.search.space import layer_sets_from_ranking
from anyshape.shape import Shape
from anyshape.train.loop import train
from anyshape.train.run import iterate_metrics
from anyshape.train.settings import TrainSettings

sys.path.insert(0, str(Path(__file__).parent))
from train import DATA, sorted_model  # noqa: E402  (the sorted parent bench/train.py makes)

TARGET = {"num_hidden_layers": 22, "hidden_size": 512, "num_attention_heads": 9, "num_key_value_heads": 3,
          "intermediate_size": 1024}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/prune"), help="work folder")
    parser.add_argument("--scores", type=Path, default=Path("bench/results/family/stages/scores.safetensors"))
    parser.add_argument("--prune-steps", type=int, default=100)
    parser.add_argument("--continue-steps", type=int, default=100)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--update-every", type=int, default=20, help="steps between domain reweightings")
    parser.add_argument("--lambda-lr", type=float, default=1.0, help="the Lagrange multipliers' learning rate")
    parser.add_argument("--test-tokens", type=int, default=16384, help="of the test protocol's tokens")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="2 + 2 steps, 4,096 test tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.prune_steps, args.continue_steps, args.test_tokens, args.update_every = 2, 2, 4096, 1
    started = time.perf_counter()

    parent_folder = sorted_model(args.out.parent / "train" / "sorted", args.scores)
    parent = anyshape.load(parent_folder)
    tokenizer = anyshape.load_tokenizer(parent_folder)
    test_ids = tokenize(tokenizer, wikitext_text(DATA / "wiki.test.raw"), min(args.test_tokens, MAX_TOKENS))

    def ppl(model_folder: Path) -> float:
        return perplexity(anyshape.load(model_folder).to(args.device), test_ids, progress=True).perplexity

    domains = write_domains(args.out / "domains")
    base = TrainSettings(
        model=str(parent_folder), domains=domains, dynamic_batch=True, reference_model=str(parent_folder),
        domain_update_every=args.update_every, sampling="largest", kd="none", seq_len=args.seq_len,
        batch_size=args.batch_size, lr=1e-4, val_batches=2, save_every=10_000, eval_every=10_000,
    )  # fmt: skip

    targeted = args.out / "targeted"
    prune(
        replace(base, prune_target=TARGET, steps=args.prune_steps, warmup_steps=max(1, args.prune_steps // 10),
                target_warmup_steps=args.prune_steps // 4, lambda_lr=args.lambda_lr),
        targeted, overwrite=True, progress=True, log=print,
    )  # fmt: skip
    ranking = Scores.load(parent_folder / SCORES_FILENAME, parent.config).layers.argsort(descending=True).tolist()
    layers = layer_sets_from_ranking(ranking, [TARGET["num_hidden_layers"]])[TARGET["num_hidden_layers"]]
    sorted_shape = Shape.from_dict({**TARGET, "layers": list(layers)}, parent.config)
    cut = args.out / "sorted" / MODEL
    anyshape.export_hf(parent, sorted_shape, cut, tokenizer=tokenizer, overwrite=True)

    settings_record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results: dict = {"settings": settings_record, "target": TARGET}
    results["fraction_non_embedding"] = sorted_shape.num_parameters(parent.config, False) / Shape.full(
        parent.config
    ).num_parameters(parent.config, False)
    runs = {
        "targeted": (targeted / MODEL, args.continue_steps),
        "sorted": (cut, args.prune_steps + args.continue_steps),  # the same tokens as pruning + continuing
    }
    for name, (model_folder, steps) in runs.items():
        row = {"zero_shot": ppl(model_folder)}
        continued = model_folder.parent / "continued"
        train(replace(base, model=str(model_folder), out=str(continued), steps=steps,
                      warmup_steps=max(1, steps // 10)), overwrite=True, progress=True, log=print)  # fmt: skip
        row["after"] = ppl(continued)
        row["domain_weights"] = [
            {"step": m["step"], **m["domains"]["weights"]} for m in iterate_metrics(continued) if "domains" in m
        ]
        results[name] = row
    results["pruning_weights"] = [
        {"step": m["step"], **m["domains"]["weights"]} for m in iterate_metrics(targeted / RUN) if "domains" in m
    ]
    results["tokens"] = (args.prune_steps + args.continue_steps) * args.batch_size * args.seq_len
    results["seconds"] = round(time.perf_counter() - started)
    print(markdown(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def write_domains(folder: Path, files: int = 120) -> str:
    """wiki, code and docs as text files in `folder` (made once); the --domains spec."""
    folder.mkdir(parents=True, exist_ok=True)
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:files]
    if not (folder / "docs.txt").is_file():
        (folder / "wiki.txt").write_text((DATA / "wiki.valid.tokens").read_text())
        (folder / "code.txt").write_text("\n\n".join(path.read_text(errors="replace") for path in stdlib))
        (folder / "docs.txt").write_text("\n\n".join(_docstrings(path) for path in stdlib))
    return ",".join(f"{name}={folder / f'{name}.txt'}" for name in ("wiki", "code", "docs"))


def _docstrings(path: Path) -> str:
    """Every docstring of a module, in order."""
    try:
        tree = ast.parse(path.read_text(errors="replace"))
    except SyntaxError:
        return ""
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    nodes = [tree, *(node for node in ast.walk(tree) if isinstance(node, definitions))]
    return "\n\n".join(doc for node in nodes if (doc := ast.get_docstring(node)))


def markdown(results: dict) -> str:
    lines = ["| method | zero-shot PPL | PPL after continued training |", "|---|---:|---:|"]
    for name in ("targeted", "sorted"):
        lines.append(f"| {name} | {results[name]['zero_shot']:.1f} | {results[name]['after']:.1f} |")
    lines += ["", "| run | step | " + " | ".join(("wiki", "code", "docs")) + " |", "|---|---:|---:|---:|---:|"]
    runs = [("pruning", results["pruning_weights"]), ("continued (targeted)", results["targeted"]["domain_weights"])]
    for run, weights in runs:
        for entry in weights:
            shares = " | ".join(f"{entry[domain]:.3f}" for domain in ("wiki", "code", "docs"))
            lines.append(f"| {run} | {entry['step']} | {shares} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
