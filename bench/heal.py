"""What training the family buys, and the best way to spend its tokens (SmolLM2-135M).

    .venv/bin/python bench/heal.py                                   # the default tokens, every way
    .venv/bin/python bench/heal.py --tokens 24576 --ways frozen       # 4x the default tokens
    .venv/bin/python bench/heal.py --quick                           # a smoke run
    python bench/heal.py --device cuda --tokens 614400               # on a GPU: 100x the default

1. The zero-shot family: `compress` at 25/50/75% of the non-embedding parameters with
   --train-tokens 0 --compensate off, on WikiText-2's wiki.valid.tokens (in --data; kept and
   reused): the members' Shapes and the sorted parent they are cut from.
2. The same training tokens of wiki.valid.tokens (its first 90%; the rest is the held-out text
   training logs) are spent in each of these ways:
     frozen      one elastic run distilled from the frozen parent: compress's train stage
     inplace     one elastic run, the largest Shape teaching in place (`train --teacher largest`)
     separate    each member alone, distilled from the frozen parent, with the same tokens each
     compensated the frozen run's members, compensated as compress does (32 x 512 fit windows)
   and, to choose the main job's default training text, the frozen way on other text:
     embedded-text  the embedded default text (the Python language reference)
     parent-text    text sampled from the parent itself (temperature 1, from the BOS token)
3. Every member (the zero-shot Shapes, plain slices of each way's weights, and the zero-shot
   members compensated: the zero-shot family compress makes by default) is judged by the
   WikiText-2 test protocol perplexity and by hellaswag, lambada and boolq accuracy (--limit
   documents each), as the parent is.

Goals: the trained 50% and 25% members at most 0.5x the zero-shot members' perplexity (frozen
against the plain slices, compensated against the compensated zero-shot members);
the frozen way within 5% of the separate way per member (training once instead of three times).
Results: OUT/results.json (written after every model, and reused: a rerun measures only what is
missing) and OUT/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import anyshape
from anyshape import ElasticLlama, Shape
from anyshape.compress.compensate import compensate
from anyshape.compress.pipeline import CompressSettings, compress
from anyshape.compress.report import describe
from anyshape.compress.stages import StageCache
from anyshape.compress.training import (
    HELD_OUT_TEXT,
    TRAIN_TEXT,
    elastic_run_settings,
    ranked_scores,
    train_elastic,
    write_texts,
)
from anyshape.data.calibration import random_windows
from anyshape.data.text import default_text, read_text, wikitext_text
from anyshape.evaluate.harness import evaluate_tasks
from anyshape.evaluate.perplexity import MAX_TOKENS, perplexity, tokenize
from anyshape.export.hf import export_hf
from anyshape.importance.permute import sort_
from anyshape.importance.scores import SCORES_FILENAME, Scores
from anyshape.runtime.sample import sample_text
from anyshape.train.loop import train
from anyshape.train.settings import RUN_FILE

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = {"hellaswag_local": "acc_norm", "lambada_openai_local": "acc", "boolq_local": "acc"}
BUDGETS = (0.25, 0.5, 0.75)  # of the non-embedding parameters
WAYS = ("frozen", "inplace", "separate", "compensated", "embedded-text", "parent-text")
TEXTS = {"embedded-text": "embedded", "parent-text": "parent"}  # ways that train on other text than WikiText-2
GOAL_RATIO, GOAL_SEPARATE = 0.5, 0.05
QUICK = dict(num_sequences=4, sequence_length=64, search_sequences=2, search_length=64, trials=4, eval_tokens=1024)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="the parent (a name, .gguf or HF folder)")
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared data folder (wikitext-2/, eval/)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/heal"), help="working and results folder")
    parser.add_argument("--tokens", type=int, default=CompressSettings().train_tokens, help="training tokens per way")
    parser.add_argument("--ways", default=",".join(WAYS), help=f"comma-separated, of: {', '.join(WAYS)}")
    parser.add_argument("--limit", type=int, default=1000, help="documents per task (the test protocol: 1000)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks that the script runs")
    args = parser.parse_args(argv)
    ways = [way for way in args.ways.split(",") if way]
    if unknown := set(ways) - set(WAYS):
        parser.error(f"unknown ways {sorted(unknown)}; choose from {', '.join(WAYS)}")
    if args.quick:
        args.tokens, args.limit = min(args.tokens, 2048), min(args.limit, 8)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"rows": {}}

    settings = CompressSettings(
        budgets=BUDGETS, budget_basis="non-embedding", data=str(args.data / "wikitext-2" / "wiki.valid.tokens"),
        train_tokens=0, compensate="off", **(QUICK if args.quick else {}),
    )  # fmt: skip
    family = args.out / "zero-shot"
    summary = compress(args.model, family, settings, overwrite=True, log=print)
    parent, folder = sorted_parent(args.model, family, args.out / "sorted-parent")
    members = {m["budget"]: Shape.from_dict(m["shape"], parent.config) for m in summary["members"]}
    training = dataclasses.replace(settings, train_tokens=args.tokens).elastic_training()
    texts = training_texts(args.data, args.out / "text-wikitext", "wikitext")
    judge = Judge(args, parent, training.trained_tokens, results, results_path)

    judge.row("parent", None, parent, parent.full_shape)
    for budget, shape in members.items():
        judge.row("zero-shot", budget, parent, shape)
    for budget, shape in members.items():
        if not judge.done("zero-shot-compensated", budget):
            fitted = compensate(parent, shape, fit_windows(judge.tokenizer, texts, settings), progress=True)
            judge.row("zero-shot-compensated", budget, fitted, fitted.full_shape, shape)
    run = args.out / f"runs-{training.trained_tokens}"
    trained: dict[tuple[str, str], ElasticLlama] = {}

    def elastic_model(teacher: str, text: str = "wikitext") -> ElasticLlama:
        """The elastic run `teacher` teaches (parent: frozen; largest: in place) on `text`
        (wikitext, embedded or parent), trained once."""
        if (teacher, text) not in trained:
            source = training_texts(args.data, args.out / f"text-{text}", text, parent, judge.tokenizer, training)
            trained[teacher, text] = elastic(
                training, folder, source, run / f"{teacher}-{text}", members, settings, teacher
            )
        return trained[teacher, text]

    for way in ways:
        for budget, shape in members.items():
            if judge.done(way, budget):
                continue
            if way in ("frozen", "inplace"):
                judge.row(way, budget, elastic_model("parent" if way == "frozen" else "largest"), shape)
            elif way in TEXTS:
                judge.row(way, budget, elastic_model("parent", TEXTS[way]), shape)
            elif way == "compensated":
                windows = fit_windows(judge.tokenizer, texts, settings)
                fitted = compensate(elastic_model("parent"), shape, windows, progress=True)
                judge.row(way, budget, fitted, fitted.full_shape, shape)
            else:
                alone = distil_alone(training, folder, parent, shape, texts, run / f"separate-{budget:g}")
                judge.row(way, budget, alone, alone.full_shape, shape)
    results.update(limit=args.limit, seconds=round(time.perf_counter() - started))
    results_path.write_text(json.dumps(results, indent=1))
    report = markdown(results)
    (args.out / "results.md").write_text(report)
    print(report)
    return 0


def sorted_parent(model: str, family: Path, folder: Path) -> tuple[ElasticLlama, Path]:
    """The parent sorted as the zero-shot family cut it, and a folder of it with the family's
    ranked scores beside it (so training samples the family's layer sets)."""
    parent = anyshape.load(model)
    scores = Scores.load(family / "stages" / "scores.safetensors", parent.config)
    sort_(parent, scores)
    if not (folder / SCORES_FILENAME).is_file():
        export_hf(parent, parent.full_shape, folder, anyshape.load_tokenizer(model), model, overwrite=True)
        ranking = StageCache(family / "stages").read("layers")["ranking"]
        ranked_scores(scores, ranking).save(folder / SCORES_FILENAME)
    return parent, folder


def training_texts(data: Path, folder: Path, text: str, parent=None, tokenizer=None, training=None) -> Path:
    """A folder of training and held-out text (90% and 10%): of wiki.valid.tokens (wikitext), of
    the embedded default text (embedded), or sampled from the sorted `parent` (parent: the
    training's tokens and a tenth more)."""
    if not (folder / HELD_OUT_TEXT).is_file():
        if text == "parent":
            sampled = sample_text(parent, tokenizer, int(1.1 * training.trained_tokens), training.seq_len).split("\n\n")
            cut = round(len(sampled) / 1.1)
            train_text, held_out = "\n\n".join(sampled[:cut]), "\n\n".join(sampled[cut:])
        else:
            whole = read_text(data / "wikitext-2" / "wiki.valid.tokens") if text == "wikitext" else default_text()
            train_text, held_out = whole[: int(0.9 * len(whole))], whole[int(0.9 * len(whole)) :]
        write_texts(folder, {TRAIN_TEXT: train_text, HELD_OUT_TEXT: held_out})
    return folder


def elastic(training, parent: Path, texts: Path, run: Path, members, settings, teacher="parent") -> ElasticLlama:
    """One elastic run of the sorted parent, as compress's train stage runs it (resumed if killed)."""
    run_settings = elastic_run_settings(training, parent, texts, run, list(members.values()), settings.fractions,
                                        settings.align)  # fmt: skip
    model, _ = train_elastic(dataclasses.replace(run_settings, teacher=teacher), print)
    return model


def distil_alone(training, parent_folder: Path, parent: ElasticLlama, shape: Shape, texts: Path, run: Path):
    """The member `shape` as a model of its own, distilled from the frozen parent with the
    elastic run's tokens, schedule and KD loss."""
    member = run.parent / f"{run.name}-start"
    if not (member / "config.json").is_file():
        export_hf(parent, shape, member, anyshape.load_tokenizer(parent_folder), overwrite=True)
    template = elastic_run_settings(training, parent_folder, texts, run, [], (1.0,), 1)
    settings = dataclasses.replace(
        template,
        model=str(member.absolute()),
        sampling="largest",
        random_shapes=0,
        teacher=str(parent_folder.absolute()),
    )
    train(settings, resume=(run / RUN_FILE).is_file(), overwrite=True, log=print, progress=True)
    return anyshape.load(run)


def fit_windows(tokenizer, texts: Path, settings: CompressSettings) -> torch.Tensor:
    """Compensation's fit windows (N, S), drawn from the training text as compress draws them."""
    ids = torch.tensor(tokenizer((texts / TRAIN_TEXT).read_text(), add_special_tokens=False)["input_ids"])
    return random_windows(ids, settings.num_sequences, settings.sequence_length, settings.seed)


class Judge:
    """Measures models and keeps every row in results.json as soon as it is measured."""

    def __init__(self, args: argparse.Namespace, parent: ElasticLlama, tokens: int, results: dict, path: Path):
        self.args, self.tokens, self.results, self.path = args, tokens, results, path
        self.tokenizer = anyshape.load_tokenizer(args.model)
        text = wikitext_text(args.data / "wikitext-2" / "wiki.test.raw")
        self.test_ids = tokenize(self.tokenizer, text, 4096 if args.quick else MAX_TOKENS)
        self.include_path = args.data / "eval" / "lm_eval_tasks"
        self.config = parent.config

    def key(self, way: str, budget: float | None) -> str:
        tokens = "" if way.startswith(("parent", "zero-shot")) and way != "parent-text" else f"@{self.tokens}"
        return f"{way}{tokens}" + ("" if budget is None else f"/{budget:g}")

    def done(self, way: str, budget: float | None) -> bool:
        return self.key(way, budget) in self.results["rows"]

    def row(self, way: str, budget: float | None, model: ElasticLlama, shape: Shape, member: Shape | None = None):
        """Perplexity and task accuracy of `shape` of `model` (`member`: the Shape it stands for,
        when `model` is already cut to it)."""
        key = self.key(way, budget)
        if self.done(way, budget):
            return
        model.to(self.args.device)
        ppl = perplexity(model, self.test_ids, shape, progress=True).perplexity
        tasks = evaluate_tasks(model, self.tokenizer, shape, list(TASKS), self.include_path, self.args.limit)
        model.to("cpu")
        cut = member or shape
        self.results["rows"][key] = {
            "way": way, "budget": budget, "shape": cut.to_dict(), "params": cut.num_parameters(self.config),
            "params_non_embedding": cut.num_parameters(self.config, embeddings=False), "ppl": ppl,
            "tasks": [dataclasses.asdict(score) for score in tasks.scores],
        }  # fmt: skip
        self.path.write_text(json.dumps(self.results, indent=1))
        print(f"{key}: perplexity {ppl:.2f}, {self.results['rows'][key]['tasks']}", flush=True)


def markdown(results: dict) -> str:
    """One table per token budget: each way's members beside the zero-shot ones, and the goals."""
    rows = results["rows"]
    zero = {row["budget"]: row for row in rows.values() if row["way"] == "zero-shot"}
    lines = [
        f"Tasks: {results['limit']} documents each, accuracy %; perplexity: WikiText-2 test protocol.",
        "",
        "| member | way | Shape | non-embedding params | WikiText-2 PPL | PPL / zero-shot | "
        + " | ".join(f"{task.removesuffix('_local')} {metric}" for task, metric in TASKS.items())
        + " |",
        "|---|---|---|---:|---:|---:|" + "---:|" * len(TASKS),
    ]
    order = {way: i for i, way in enumerate(("parent", "zero-shot", "zero-shot-compensated", *WAYS))}
    for key, row in sorted(rows.items(), key=lambda kv: (kv[1]["budget"] or 0, order[kv[1]["way"]], kv[0])):
        base = zero.get(row["budget"])
        ratio = f"{row['ppl'] / base['ppl']:.2f}x" if base is not None and row is not base else ""
        name = "parent" if row["budget"] is None else f"{row['budget']:.0%}"
        accuracies = " | ".join(_accuracy(row, task, metric) for task, metric in TASKS.items())
        lines.append(
            f"| {name} | {key.split('/')[0]} | {describe(row['shape'])} | {row['params_non_embedding'] / 1e6:.1f}M | "
            f"{row['ppl']:.1f} | {ratio} | {accuracies} |"
        )
    return "\n".join([*lines, "", *goals(rows), f"\ntotal {results['seconds']} s"])


def goals(rows: dict) -> list[str]:
    """The verdicts: trained members against the zero-shot ones (plain against plain, compensated
    against compensated), and the frozen way against each member trained alone."""
    verdicts = []
    for key, row in rows.items():
        way, budget = row["way"], row["budget"]
        baseline = {"frozen": "zero-shot", "compensated": "zero-shot-compensated"}.get(way)
        base = rows.get(f"{baseline}/{budget:g}") if baseline is not None else None
        if base is not None and budget in (0.25, 0.5):
            ratio = row["ppl"] / base["ppl"]
            verdicts.append(f"{key}: {ratio:.2f}x the perplexity of {base['way']} (goal at most {GOAL_RATIO}x: "
                            f"{'met' if ratio <= GOAL_RATIO else 'MISSED'})")  # fmt: skip
        separate = rows.get(key.replace("frozen", "separate"))
        if way == "frozen" and separate is not None:
            off = row["ppl"] / separate["ppl"] - 1
            verdicts.append(f"{key}: {off:+.1%} against each member trained alone (goal within {GOAL_SEPARATE:.0%}: "
                            f"{'met' if off <= GOAL_SEPARATE else 'MISSED'})")  # fmt: skip
    return verdicts


def _accuracy(row: dict, task: str, metric: str) -> str:
    for score in row["tasks"]:
        if score["task"] == task and score["metric"] == metric:
            return f"{100 * score['value']:.1f} ± {100 * score['stderr']:.1f}"
    return ""


if __name__ == "__main__":
    raise SystemExit(main())
