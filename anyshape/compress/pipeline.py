"""`compress`: one model in, a family of smaller standard models out.

Stages, each resumable (`compress.stages`):
    scores     activation importance of every unit on calibration windows
    layers     a ranking of the layers (block importance from the scores, or `drop` / `dp`)
    search-B   for each budget B, a search of the Shapes of the sorted model within
               [(1 - band) B, B] parameters, minimising proxy perplexity
    train      (train_tokens > 0) one elastic run of the sorted parent, its students the best
               Shape of each search and samples of the search space, distilled from the frozen
               parent (`compress.training`); kept as OUT/elastic/, the members' model
    search-trained-B   the search's best Shapes ranked again on the trained weights
    member-B   the candidates with the lowest proxy perplexity (the search's Shapes and the
               single-axis heuristics at B) are compensated; the best on held-out windows,
               compensated when that helps, is exported
    eval-B     perplexity of the exported member and of the plain slice on the evaluation split,
               with the single-axis heuristics at the same budget, and measured latency
    report     report.md, pareto.png and summary.json

The text is split by tokens: the first `eval_tokens` are the evaluation split; the rest is cut
in two halves, the first for scores, compensation and training, the second for the search proxy,
the check of compensation and training's held-out perplexity. The family is built in
`.<name>.partial/` beside OUT and renamed to OUT when complete, so OUT never holds a
half-written family.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from anyshape.checkpoints import load, load_config, load_tokenizer
from anyshape.compress.baselines import single_axis_shapes
from anyshape.compress.compensate import RIDGE, compensate
from anyshape.compress.elastic import ELASTIC, ElasticRecord
from anyshape.compress.report import write_report
from anyshape.compress.stages import StageCache, input_hash, model_identity, write_json
from anyshape.compress.training import (
    HELD_OUT_TEXT,
    KD,
    RANDOM_SHAPES,
    TRAIN_TEXT,
    ElasticTraining,
    elastic_run_settings,
    ranked_scores,
    train_elastic,
    write_texts,
)
from anyshape.data.calibration import random_windows
from anyshape.data.text import DEFAULT_TEXT_NAME, load_text
from anyshape.errors import AnyshapeError, DataError, ShapeError
from anyshape.evaluate.perplexity import perplexity
from anyshape.export.extract import extract_model
from anyshape.export.hf import export_hf
from anyshape.files import clear_leftovers, publish_directory
from anyshape.importance.layers import select_layers
from anyshape.importance.permute import sort_
from anyshape.importance.scores import SCORES_FILENAME, Scores, score
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama
from anyshape.model.nll import mean_nll
from anyshape.runtime.sample import sample_text, start_token
from anyshape.search.algorithms import SearchResult, search_budget
from anyshape.search.objectives import LatencyTable, Quality, cost_functions
from anyshape.search.pareto import non_dominated, plot_front
from anyshape.search.space import DEFAULT_ALIGN, DEFAULT_FRACTIONS, SearchSpace
from anyshape.shape import Shape
from anyshape.version import __version__

BASES = ("total", "non-embedding")
DEFAULT_TRAIN_TOKENS = 6_144  # 6 steps of 4 x 256: with sampling its text, about 4 minutes on a 2-core CPU
RESCORED = 10  # the zero-shot search's best Shapes per budget, evaluated again on the trained weights
COMPENSATION_MODES = ("auto", "on", "off")
TRAIN_TEXTS = ("data", "parent")  # what the elastic run trains on: the text's fit half, or the parent's own text
DEPTH_METHODS = ("bi", "drop", "dp")
SUMMARY = "summary.json"


@dataclass(frozen=True)
class CompressSettings:
    """Everything a compress run depends on besides the model (all recorded in summary.json)."""

    budgets: tuple[float, ...] = (0.25, 0.5, 0.75)  # fractions of the parent's parameters
    budget_basis: str = "total"  # or "non-embedding"
    data: str | None = None  # text file; None: the embedded default text
    num_sequences: int = 32  # calibration windows for scores and compensation
    sequence_length: int = 512
    search_sequences: int = 8  # proxy windows for the search's perplexity
    search_length: int = 256
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    align: int = DEFAULT_ALIGN  # hidden and MLP sizes are multiples of this
    depth_method: str = "bi"
    algorithm: str = "nsga2"
    trials: int = 40  # Shapes evaluated per budget
    candidates: int = 2  # lowest-proxy Shapes (searched or single-axis) compensated and compared per budget
    band: float = 0.1  # search Shapes within [(1 - band) B, B]
    compensate: str = "auto"
    ridge: float = RIDGE
    eval_tokens: int = 8192
    seed: int = 0
    dtype: str = "float32"  # of the exported weights
    train_tokens: int = DEFAULT_TRAIN_TOKENS  # of the elastic run; 0: a zero-shot family, no training
    train_seq_len: int = 256
    train_batch_size: int = 4  # sequences per optimizer step
    train_lr: float = 3e-4
    train_text: str = "parent"  # text sampled from the parent; "data": the fit half of `data`

    def elastic_training(self) -> ElasticTraining:
        return ElasticTraining(
            self.train_tokens, self.train_seq_len, self.train_batch_size, self.train_lr, RANDOM_SHAPES, KD, self.seed
        )

    def check(self) -> CompressSettings:
        """Returns self, or raises an AnyshapeError naming the bad setting and its allowed values."""
        for name, value, allowed in (
            ("budget basis", self.budget_basis, BASES),
            ("compensate", self.compensate, COMPENSATION_MODES),
            ("depth method", self.depth_method, DEPTH_METHODS),
            ("dtype", self.dtype, ("float32", "bfloat16", "float16")),
        ):
            if value not in allowed:
                raise AnyshapeError(f"unknown {name} {value!r}; choose one of {', '.join(allowed)}")
        if not self.budgets or not all(0 < b <= 1 for b in self.budgets):
            raise ShapeError(f"budgets {list(self.budgets)} must each be a fraction in (0, 1], e.g. 0.25,0.5,0.75")
        if not 0 <= self.band < 1:
            raise AnyshapeError(f"band={self.band} must be in [0, 1)")
        if self.align < 1:
            raise AnyshapeError(f"align={self.align} must be at least 1 (1: widths of any size)")
        if self.candidates < 1:
            raise AnyshapeError(f"candidates={self.candidates} must be at least 1 (1: the search's best Shape only)")
        if self.train_tokens < 0:
            raise AnyshapeError(f"train_tokens={self.train_tokens} must be 0 (no training) or more")
        for name in ("train_seq_len", "train_batch_size"):
            if getattr(self, name) < (2 if name == "train_seq_len" else 1):
                raise AnyshapeError(f"{name}={getattr(self, name)} is too small")
        if self.train_text not in TRAIN_TEXTS:
            raise AnyshapeError(f"unknown train text {self.train_text!r}; choose one of {', '.join(TRAIN_TEXTS)}")
        if not self.train_lr > 0:
            raise AnyshapeError(f"train_lr={self.train_lr} must be positive")
        return self


@dataclass
class Context:
    """What the stages share: the loaded parts and the token splits."""

    model_ref: str
    settings: CompressSettings
    config: LlamaFamilyConfig
    stages: StageCache
    log: Callable[[str], None]
    identity: dict[str, Any]
    fit_split: Tensor = field(init=False)  # (T1,) tokens for scores, compensation and training
    check_split: Tensor = field(init=False)  # (T2,) held-out tokens: search proxy, compensation check
    fit_ids: Tensor = field(init=False)  # (N, S) calibration windows of the fit split
    check_ids: Tensor = field(init=False)  # (M, S') windows of the check split
    eval_ids: Tensor = field(init=False)  # (T,) the evaluation split
    model: ElasticLlama | None = None  # the parent: loaded on first use, then sorted
    trained: ElasticLlama | None = None  # the elastic run's model, once the train stage is done
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)

    def parent_params(self) -> int:
        return Shape.full(self.config).num_parameters(self.config, self.embeddings)

    @property
    def embeddings(self) -> bool:
        return self.settings.budget_basis == "total"


def compress(
    model_ref: str,
    out: str | Path,
    settings: CompressSettings = CompressSettings(),  # noqa: B008  (frozen, so never mutated)
    overwrite: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Runs (or resumes) every stage and writes the family to `out`; returns the summary."""
    settings.check()
    out = Path(out)
    config = load_config(model_ref)
    check_budgets(config, settings)
    if settings.train_tokens and settings.train_text == "parent":
        start_token(load_tokenizer(model_ref))  # fails now rather than after the searches
    identity = model_identity(model_ref)
    run_key = input_hash(model=identity, settings=asdict(settings), version=__version__)
    clear_leftovers(out)  # a family whose replacement was killed half-way is put back
    if out.exists():
        if (out / SUMMARY).is_file() and StageCache(out / "stages").done("run", run_key):
            log(f"{out} is up to date with these settings; nothing to do")
            return StageCache(out / "stages").read("run")
        if not overwrite:
            raise AnyshapeError(
                f"{out} already exists and was made with other settings; choose another --out, or pass "
                "--overwrite to redo what changed (finished stages with the same inputs are reused)"
            )
    work = out.parent / f".{out.name}.partial"
    if out.exists() and not work.exists():  # reuse the old family's finished stages
        shutil.copytree(out, work, copy_function=os.link)
    context = Context(model_ref, settings, config, StageCache(work / "stages"), log, identity)
    split_tokens(context)

    scores, scores_key = run_scores(context)
    ranking, layers_key = run_layers(context, scores, scores_key)
    searches = {budget: run_search(context, budget, ranking, layers_key) for budget in settings.budgets}
    zero_shot: dict[float, Shape | None] = dict.fromkeys(settings.budgets)  # the untrained best, if training
    if settings.train_tokens:
        zero_shot = {
            budget: candidates(context, budget, result, ranking)[0][1] for budget, (result, _) in searches.items()
        }
        weights_key = run_train(context, work, scores, ranking, layers_key, list(zero_shot.values()))
        searches = {
            budget: run_rescore(context, budget, result, search_key, weights_key)
            for budget, (result, search_key) in searches.items()
        }
    members = []
    for budget, (result, search_key) in searches.items():
        member, member_key = run_member(context, work, budget, result, search_key, ranking)
        members.append(run_eval(context, work, budget, member, member_key, ranking, zero_shot[budget]))
    dense = run_dense(context)
    summary = {
        "anyshape_version": __version__,
        "model": model_ref,
        "parent": {"shape": Shape.full(config).to_dict(), **dense},
        "settings": asdict(settings),
        "data": settings.data or DEFAULT_TEXT_NAME,
        "members": members,
        **({"training": context.stages.read("train")} if settings.train_tokens else {}),
        "stages": context.timings,
    }
    write_pareto_plot(context, work / "pareto.png")
    write_report(summary, work / "report.md")
    write_json(work / SUMMARY, summary)
    context.stages.save("run", run_key, summary)
    publish_directory(work, out)
    log(f"family written to {out}: {', '.join(m['folder'] for m in members)}, report.md, pareto.png, {SUMMARY}")
    return StageCache(out / "stages").read("run")


def check_budgets(config: LlamaFamilyConfig, settings: CompressSettings) -> None:
    """Raises ShapeError if a budget is below the smallest Shape of the search space."""
    embeddings = settings.budget_basis == "total"
    smallest = SearchSpace.from_fractions(config, settings.fractions, align=settings.align).smallest()
    reachable = smallest.num_parameters(config, embeddings) / Shape.full(config).num_parameters(config, embeddings)
    low = min(settings.budgets)
    if low < reachable:
        raise ShapeError(
            f"budget {low:g} is below the smallest Shape of the search space, "
            f"{reachable:.4f} of the parent's {settings.budget_basis} parameters; the smallest reachable "
            f"budget is {math.ceil(reachable * 1000) / 1000:g} (or add smaller --fractions or a smaller --align)"
        )


def split_tokens(context: Context) -> None:
    """Tokenizes the text once and cuts it into the evaluation, fit and check splits."""
    s = context.settings
    text = load_text(s.data)
    ids = torch.tensor(load_tokenizer(context.model_ref)(text, add_special_tokens=False)["input_ids"])
    needed = s.eval_tokens + 2 * max(s.sequence_length, s.search_length)
    if len(ids) < needed:
        raise DataError(
            f"the text has {len(ids)} tokens; compress needs at least {needed} (--eval-tokens {s.eval_tokens} "
            f"plus two calibration halves of {max(s.sequence_length, s.search_length)}); give more text or "
            "lower --eval-tokens / --sequence-length"
        )
    middle = s.eval_tokens + (len(ids) - s.eval_tokens) // 2
    context.eval_ids = ids[: s.eval_tokens]
    context.fit_split, context.check_split = ids[s.eval_tokens : middle], ids[middle:]
    context.fit_ids = random_windows(context.fit_split, s.num_sequences, s.sequence_length, s.seed)
    context.check_ids = random_windows(context.check_split, s.search_sequences, s.search_length, s.seed + 1)


def model(context: Context) -> ElasticLlama:
    """The parent model, loaded once."""
    if context.model is None:
        context.log(f"loading {context.model_ref}")
        context.model = load(context.model_ref)
    return context.model


def members_model(context: Context) -> ElasticLlama:
    """The model the members are cut from: the elastic run's once it is done, else the parent."""
    return context.trained if context.trained is not None else model(context)


def _timed(context: Context, stage: str, reused: bool, started: float) -> None:
    context.timings[stage] = {"seconds": round(time.perf_counter() - started, 1), "reused": reused}
    context.log(f"[{stage}] {'reused' if reused else 'done'} ({context.timings[stage]['seconds']}s)")


def run_scores(context: Context) -> tuple[Scores, str]:
    """Activation importance scores (mean/mean aggregation, block importance for layers)."""
    s, started = context.settings, time.perf_counter()
    key = input_hash(
        model=context.identity, data=s.data, n=s.num_sequences, length=s.sequence_length, seed=s.seed,
        eval_tokens=s.eval_tokens,
    )  # fmt: skip
    path = context.stages.path("scores", ".safetensors")
    reused = context.stages.done("scores", key)
    if not reused:
        context.log(f"[scores] activation importance on {s.num_sequences} x {s.sequence_length} tokens")
        scores = score(model(context), context.fit_ids, progress=True)
        scores.save(path)
        context.stages.finish("scores", key)
    scores = Scores.load(path, context.config)
    sorted_scores = sort_(model(context), scores)  # exact: every width below is a prefix of the best units
    _timed(context, "scores", reused, started)
    return sorted_scores, key


def run_layers(context: Context, scores: Scores, scores_key: str) -> tuple[list[int], str]:
    """The layers, most important first: by block importance (bi), or by iterative drop / DP
    over the depths of the search grid (the deepest kept sets first)."""
    s, started = context.settings, time.perf_counter()
    key = input_hash(scores=scores_key, method=s.depth_method, fractions=s.fractions)
    reused = context.stages.done("layers", key)
    if not reused:
        if s.depth_method == "bi":
            ranking = scores.layers.argsort(descending=True, stable=True).tolist()
            record = {"method": "bi", "ranking": ranking}
        else:
            context.log(f"[layers] depth selection by {s.depth_method}")
            selection = select_layers(model(context), context.check_ids, s.depth_method, progress=True)
            ranking = ranking_from_nested(selection.layers, context.config.num_hidden_layers)
            record = {"method": s.depth_method, "ranking": ranking, **selection.to_dict()}
        context.stages.save("layers", key, record)
    ranking = context.stages.read("layers")["ranking"]
    _timed(context, "layers", reused, started)
    return ranking, key


def run_train(
    context: Context, work: Path, scores: Scores, ranking: list[int], layers_key: str, members: list[Shape]
) -> str:
    """The elastic run (`compress.training`) of the sorted parent on the fit split, held out on
    the check split; its model is kept as OUT/elastic/ (with the ranked scores beside it, so that
    `search` and `train` use compress's layer ranking) and becomes the members' model. Killed
    mid-run, it resumes from its last checkpoint. Returns the stage's key."""
    s, started = context.settings, time.perf_counter()
    training = s.elastic_training()
    key = input_hash(
        layers=layers_key, members=[m.to_dict() for m in members], training=asdict(training), data=s.data,
        eval_tokens=s.eval_tokens, fractions=s.fractions, align=s.align, dtype=s.dtype, text=s.train_text,
    )  # fmt: skip
    folder = work / ELASTIC
    reused = context.stages.done("train", key) and folder.is_dir()
    if not reused:
        tokenizer = load_tokenizer(context.model_ref)
        parent, texts, run = (context.stages.path(name, "") for name in ("sorted-parent", "train-text", "train-run"))
        export_hf(model(context), Shape.full(context.config), parent, tokenizer, overwrite=True)
        ranked_scores(scores, ranking).save(parent / SCORES_FILENAME)  # training samples compress's layer sets
        write_texts(texts, training_texts(context, training, tokenizer))
        run_settings = elastic_run_settings(training, parent, texts, run, members, s.fractions, s.align)
        trained, held_out = train_elastic(run_settings, context.log)
        export_hf(
            trained.to(getattr(torch, s.dtype)), trained.full_shape, folder, tokenizer, context.model_ref,
            overwrite=True, extra={ELASTIC: elastic_record(s, training).to_dict()},
        )  # fmt: skip
        ranked_scores(scores, ranking).save(folder / SCORES_FILENAME)
        record = {
            "tokens": training.trained_tokens,
            "steps": training.steps,
            "seconds": round(time.perf_counter() - started, 1),
            "held_out_ppl": held_out,  # {"before": {slot: ppl}, "after": ...} on the check split
        }
        context.stages.save("train", key, record)
        for leftover in (run, parent, texts):  # OUT/elastic/ holds what is kept
            shutil.rmtree(leftover, ignore_errors=True)
    context.log(f"loading the elastic model {folder}")
    context.trained = load(folder)
    _timed(context, "train", reused, started)
    return key


def training_texts(context: Context, training: ElasticTraining, tokenizer) -> dict[str, str]:
    """The elastic run's training and held-out text: the fit and check splits of the text, or
    text sampled from the parent (`train_text` "parent": the run's tokens, and a tenth of them,
    at least one sequence, held out)."""
    if context.settings.train_text == "data":
        return {
            TRAIN_TEXT: tokenizer.decode(context.fit_split.tolist()),
            HELD_OUT_TEXT: tokenizer.decode(context.check_split.tolist()),
        }
    context.log(f"[train] sampling {training.trained_tokens:,} tokens of text from the parent")
    held_out = max(training.seq_len, training.trained_tokens // 10)
    cuda = torch.cuda.is_available()  # where training will run: sampling there too, wider batches
    parent = model(context).to("cuda" if cuda else "cpu")
    try:
        return {
            name: sample_text(parent, tokenizer, tokens, training.seq_len, seed, batch_size=256 if cuda else 16)
            for name, tokens, seed in (
                (TRAIN_TEXT, training.trained_tokens, training.seed),
                (HELD_OUT_TEXT, held_out, training.seed + 1),
            )
        }
    finally:
        parent.to("cpu")


def elastic_record(settings: CompressSettings, training: ElasticTraining) -> ElasticRecord:
    """What OUT/elastic/ keeps of the settings, so that `extract --budget` searches it as compress did."""
    s = settings
    return ElasticRecord(training.trained_tokens, s.fractions, s.align, s.budget_basis, s.band, s.algorithm, s.trials)


def ranking_from_nested(layers: dict[int, tuple[int, ...]], num_layers: int) -> list[int]:
    """A ranking (most important first) from kept sets per depth: a layer ranks by the smallest
    depth whose set keeps it (DP sets need not be nested; each depth's set still comes first)."""
    first_kept = {
        i: min((k for k, kept in layers.items() if i in kept), default=num_layers + 1) for i in range(num_layers)
    }
    return sorted(range(num_layers), key=lambda i: (first_kept[i], i))


def run_search(context: Context, budget: float, ranking: list[int], layers_key: str) -> tuple[SearchResult, str]:
    """The search within [(1 - band) B, B] of the parent's parameters."""
    s, started = context.settings, time.perf_counter()
    stage = f"search-{budget:g}"
    key = input_hash(
        layers=layers_key, budget=budget, basis=s.budget_basis, band=s.band, algorithm=s.algorithm,
        trials=s.trials, seed=s.seed, search=(s.search_sequences, s.search_length), align=s.align,
    )  # fmt: skip
    reused = context.stages.done(stage, key)
    if not reused:
        space = SearchSpace.from_fractions(context.config, s.fractions, ranking, s.align)
        cost = "params" if context.embeddings else "params_non_embedding"
        high = budget * context.parent_params()
        context.log(f"[{stage}] {s.algorithm}, {s.trials} Shapes within {(1 - s.band) * high:,.0f}..{high:,.0f} {cost}")
        elastic = model(context)
        result = search_budget(
            space, Quality(elastic, context.check_ids), cost_functions(elastic), cost, high, s.band, s.algorithm,
            s.trials, s.seed, progress=True,
        )  # fmt: skip
        result.save(context.stages.path(stage))
        context.stages.finish(stage, key)
    result = SearchResult.load(context.stages.path(stage), context.config)
    _timed(context, stage, reused, started)
    return result, key


def run_rescore(
    context: Context, budget: float, result: SearchResult, search_key: str, weights_key: str
) -> tuple[SearchResult, str]:
    """The search again on the trained weights: the zero-shot search's RESCORED best Shapes
    evaluated anew on the check windows (`candidates` adds the single-axis heuristics). Training
    changes which is best; re-ranking the zero-shot search's best costs a quarter of a new search."""
    started = time.perf_counter()
    stage = f"search-trained-{budget:g}"
    key = input_hash(search=search_key, weights=weights_key, rescored=RESCORED)
    reused = context.stages.done(stage, key)
    if not reused:
        context.log(f"[{stage}] the zero-shot search's {RESCORED} best Shapes on the trained weights")
        quality = Quality(members_model(context), context.check_ids)
        best = sorted(result.trials, key=lambda trial: trial.quality)[:RESCORED]
        trials = [replace(trial, quality=quality(trial.shape)) for trial in best]
        replace(result, trials=trials, algorithm=f"{result.algorithm}, rescored").save(context.stages.path(stage))
        context.stages.finish(stage, key)
    rescored = SearchResult.load(context.stages.path(stage), context.config)
    _timed(context, stage, reused, started)
    return rescored, key


def run_member(
    context: Context, work: Path, budget: float, result: SearchResult, search_key: str, ranking: list[int]
) -> tuple[dict[str, Any], str]:
    """Exports the best candidate: compensated when the settings (and, in `auto`, the held-out
    check) say so. Compensation changes which Shape is best, so the `candidates` Shapes of lowest
    plain proxy perplexity are each compensated and compared on the held-out windows."""
    s, started = context.settings, time.perf_counter()
    stage = f"member-{budget:g}"
    key = input_hash(
        search=search_key, ranking=ranking, compensate=s.compensate, ridge=s.ridge, dtype=s.dtype,
        candidates=s.candidates,
    )  # fmt: skip
    folder = work / f"{budget:g}"
    reused = context.stages.done(stage, key) and folder.is_dir()
    if not reused:
        elastic = members_model(context)
        ranked = candidates(context, budget, result, ranking)
        source, shape, plain = ranked[0]
        child = extract_model(elastic, shape)
        record: dict[str, Any] = {"shape": shape.to_dict(), "source": source, "folder": folder.name}
        record["compensated"] = False
        if s.compensate != "off":
            tried = []
            for source, candidate, candidate_plain in ranked[: s.candidates]:
                context.log(f"[{stage}] compensating {source} {candidate.num_hidden_layers}-layer Shape")
                fitted = compensate(elastic, candidate, context.fit_ids, ridge=s.ridge, progress=True)
                check = {"plain": candidate_plain, "compensated": math.exp(mean_nll(fitted, context.check_ids))}
                tried.append((check, source, candidate, fitted))
            check, source, candidate, fitted = min(tried, key=lambda t: t[0]["compensated"])
            record["candidates"] = [{"source": t[1], "shape": t[2].to_dict(), "check_ppl": t[0]} for t in tried]
            if s.compensate == "on" or check["compensated"] < plain:
                child, shape = fitted, candidate
                record.update(shape=shape.to_dict(), source=source, compensated=True, check_ppl=check)
            else:
                record["check_ppl"] = {"plain": plain, "compensated": tried[0][0]["compensated"]}
        export_hf(
            child.to(getattr(torch, s.dtype)), child.full_shape, folder, load_tokenizer(context.model_ref),
            context.model_ref, overwrite=True, lineage=(context.config, shape),
            extra={"budget": budget, "budget_basis": s.budget_basis, "compensated": record["compensated"]},
        )  # fmt: skip
        context.stages.save(stage, key, record)
    _timed(context, stage, reused, started)
    return context.stages.read(stage), key


def candidates(
    context: Context, budget: float, result: SearchResult, ranking: list[int]
) -> list[tuple[str, Shape, float]]:
    """(source, Shape, plain proxy perplexity) of the search's Shapes and of the single-axis
    heuristics within the search's band, lowest perplexity first. The heuristics lie off the
    search's grid (e.g. exactly the MLP width that fills the budget), so they are worth a try."""
    quality = Quality(members_model(context), context.check_ids)
    high = budget * context.parent_params()
    heuristics = single_axis_shapes(context.config, high, context.embeddings, ranking, context.settings.align)
    in_band = {
        name: shape
        for name, shape in heuristics.items()
        if shape is not None
        and shape.num_parameters(context.config, context.embeddings) >= (1 - context.settings.band) * high
    }
    ranked = {trial.shape: ("search", trial.shape, trial.quality) for trial in result.trials}  # each Shape once
    ranked.update({shape: (name, shape, quality(shape)) for name, shape in in_band.items() if shape not in ranked})
    return sorted(ranked.values(), key=lambda c: (c[2], c[1].num_parameters(context.config)))


def run_eval(
    context: Context,
    work: Path,
    budget: float,
    member: dict[str, Any],
    member_key: str,
    ranking: list[int],
    zero_shot: Shape | None,
) -> dict[str, Any]:
    """Perplexity on the evaluation split of the exported member (as users load it), of the
    plain slice, and of the single-axis heuristics at the same budget; measured latency. After
    training, also the perplexity of the zero-shot search's best Shape of the parent (no
    compensation): what the training gained."""
    s, started = context.settings, time.perf_counter()
    stage = f"eval-{budget:g}"
    key = input_hash(member=member_key, ranking=ranking)
    reused = context.stages.done(stage, key)
    if not reused:
        elastic, config = members_model(context), context.config
        shape = Shape.from_dict(member["shape"], config)
        context.log(f"[{stage}] perplexity on {s.eval_tokens} held-out tokens")
        exported = load(work / member["folder"])
        record = {
            "budget": budget,
            **member,
            "num_parameters": shape.num_parameters(config),
            "num_parameters_non_embedding": shape.num_parameters(config, embeddings=False),
            "fraction": shape.num_parameters(config, context.embeddings) / context.parent_params(),
            "exported_parameters": sum(p.numel() for p in exported.parameters()),
            "flops_per_token": shape.flops_per_token(config),
            "latency": latency_table(context).measure(elastic, shape),
            "ppl": _ppl(exported, context.eval_ids),
            "ppl_plain": _ppl(elastic, context.eval_ids, shape),
        }
        baselines = single_axis_shapes(config, budget * context.parent_params(), context.embeddings, ranking, s.align)
        record["baselines"] = {
            name: None
            if heuristic is None
            else {
                "shape": heuristic.to_dict(),
                "num_parameters": heuristic.num_parameters(config, context.embeddings),
                "ppl": _ppl(elastic, context.eval_ids, heuristic),
            }
            for name, heuristic in baselines.items()
        }
        if zero_shot is not None:
            parent_ppl = _ppl(model(context), context.eval_ids, zero_shot)
            record["zero_shot"] = {"shape": zero_shot.to_dict(), "ppl": parent_ppl}
        context.stages.save(stage, key, record)
    _timed(context, stage, reused, started)
    return context.stages.read(stage)


def run_dense(context: Context) -> dict[str, Any]:
    """The parent's perplexity on the evaluation split and its measured latency."""
    s, started = context.settings, time.perf_counter()
    key = input_hash(model=context.identity, data=s.data, eval_tokens=s.eval_tokens)
    reused = context.stages.done("eval-parent", key)
    if not reused:
        elastic = model(context)
        context.stages.save(
            "eval-parent",
            key,
            {
                "num_parameters": elastic.full_shape.num_parameters(context.config),
                "num_parameters_non_embedding": elastic.full_shape.num_parameters(context.config, embeddings=False),
                "flops_per_token": elastic.full_shape.flops_per_token(context.config),
                "latency": latency_table(context).measure(elastic, elastic.full_shape),
                "ppl": _ppl(elastic, context.eval_ids),
            },
        )
    _timed(context, "eval-parent", reused, started)
    return context.stages.read("eval-parent")


def latency_table(context: Context) -> LatencyTable:
    return LatencyTable(context.stages.path("latency"), input_hash(model=context.identity))


def _ppl(model: ElasticLlama, token_ids: Tensor, shape: Shape | None = None) -> float:
    return perplexity(model, token_ids, shape, progress=True).perplexity


def write_pareto_plot(context: Context, path: Path) -> None:
    """Proxy perplexity vs parameters and vs FLOPs of every Shape the searches evaluated."""
    rows = []
    for budget in context.settings.budgets:
        result = SearchResult.load(context.stages.path(f"search-{budget:g}"), context.config)
        rows += [trial.to_dict(result.quality) for trial in result.trials]
    cost = "params" if context.embeddings else "params_non_embedding"
    front = [rows[i] for i in non_dominated([(row[cost], row["ppl"]) for row in rows])]
    plot_front(rows, front, [cost, "flops"], "ppl", path)
