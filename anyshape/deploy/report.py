"""The deployment report of a family written by `anyshape compress`: for the parent and every
member, one row of what deployment needs to know, as markdown, JSON and a PNG of plots.

A family whose members were trained (compress's train stage) also has, per member, a row of its
zero-shot Shape: the untrained slice of the sorted parent the search chose before training, so
that training's gain shows in every metric. It has no file of its own; its speed is the parent's
at that Shape (speed depends on the geometry, not on the weights).

Per model, measured on that model as it is stored (a member's folder, the parent's reference):
    parameters   total, and non-embedding (without the embedding and LM-head matrices), by
                 `Shape.num_parameters` of the model's own config
    file bytes   the weight files on disk: a member's `*.safetensors`; the parent's source
                 (its `.gguf` file, or its folder's `*.safetensors`)
    perplexity   `evaluate.perplexity`'s protocol (as `anyshape evaluate --ppl`) on one text
    tasks        zero-shot lm-eval metrics with standard errors (`evaluate.harness`), if asked
    speed        prefill and decode tokens/s and peak memory per runtime (`deploy.speed`), if asked
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from anyshape.checkpoints import load, load_config, load_tokenizer, resolve
from anyshape.compress.report import describe
from anyshape.compress.stages import StageCache
from anyshape.data.text import DEFAULT_TEXT_NAME, load_text
from anyshape.deploy.speed import (
    FAMILY_SUMMARY,
    RUNTIMES,
    Skipped,
    SpeedResult,
    SpeedSettings,
    benchmark,
    family_members,
)
from anyshape.errors import AnyshapeError, CheckpointError
from anyshape.evaluate import BATCH_SIZE
from anyshape.evaluate.perplexity import MAX_TOKENS, PerplexityResult, perplexity, tokenize
from anyshape.extras import require
from anyshape.files import atomic_files
from anyshape.importance.permute import sort_
from anyshape.importance.scores import Scores
from anyshape.model.llama import ElasticLlama
from anyshape.shape import Shape
from anyshape.version import __version__

if TYPE_CHECKING:  # lm-eval is imported only where tasks run
    from anyshape.evaluate.harness import TaskScore

DEFAULT_NAME = "deploy-report.md"  # written inside the family folder unless told otherwise
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")  # not accuracies
Point = tuple[float, float, float]  # a plotted value, and its error bar's length below and above


@dataclass(frozen=True)
class ReportSettings:
    """What to measure. `speed=None` measures no speed; `tasks=()` runs no lm-eval task."""

    tasks: tuple[str, ...] = ()
    include_path: str | None = None  # a folder of task YAML files of your own
    limit: int | None = None  # documents per task; None: all
    batch_size: int = BATCH_SIZE  # lm-eval requests per forward pass
    data: str | None = None  # perplexity text (.txt or .jsonl); None: the embedded default
    max_tokens: int = MAX_TOKENS  # tokens of the text to score
    speed: SpeedSettings | None = field(default_factory=SpeedSettings)
    runtimes: tuple[str, ...] = ("anyshape",)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.runtimes) - set(RUNTIMES))
        if unknown or not self.runtimes:
            raise AnyshapeError(f"runtimes {list(self.runtimes)}: choose one or more of {', '.join(RUNTIMES)}")
        if self.limit is not None and self.limit < 1:
            raise AnyshapeError(f"limit={self.limit} must be at least 1 document per task")
        if self.batch_size < 1 or self.max_tokens < 2:
            raise AnyshapeError(
                f"batch_size={self.batch_size} must be at least 1 and max_tokens={self.max_tokens} at least 2"
            )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "data": self.data or DEFAULT_TEXT_NAME, "tasks": list(self.tasks)}


@dataclass(frozen=True)
class ModelReport:
    """The measurements of one model of the family."""

    name: str  # the member's folder name, "parent", or "<folder> zero-shot"
    role: str  # "parent", "member" or "zero-shot"
    reference: str  # what anyshape.load was given (zero-shot: the parent, sorted and sliced)
    shape: str  # its geometry, e.g. "L15 H384 Q6/G2 F1024"
    num_parameters: int
    num_parameters_non_embedding: int
    file_bytes: int  # the weight files' total size
    weight_files: list[str]  # their names
    perplexity: PerplexityResult
    tasks: list[TaskScore]
    samples: dict[str, int]  # documents evaluated per task
    speed: list[SpeedResult]  # one per runtime measured

    def to_dict(self) -> dict[str, Any]:
        return {
            **{key: value for key, value in self.__dict__.items() if key not in ("perplexity", "tasks", "speed")},
            "perplexity": self.perplexity.to_dict(),
            "tasks": [asdict(score) for score in self.tasks],
            "speed": [result.to_dict() for result in self.speed],
        }

    def score(self, task: str, metric: str) -> TaskScore | None:
        return next((s for s in self.tasks if (s.task, s.metric) == (task, metric)), None)

    def speed_in(self, runtime: str) -> SpeedResult | None:
        return next((r for r in self.speed if r.runtime == runtime), None)


@dataclass(frozen=True)
class FamilyReport:
    family: str  # the family folder
    parent: str  # summary.json's "model"
    settings: ReportSettings
    models: list[ModelReport]  # the parent first, then the members in summary.json's order, each
    # followed by its zero-shot row when the family was trained
    skipped: list[Skipped]  # runtimes that could not run, with the reason

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "parent": self.parent,
            "anyshape_version": __version__,
            "cpu_count": os.cpu_count(),
            "settings": self.settings.to_dict(),
            "models": [model.to_dict() for model in self.models],
            "skipped": [asdict(s) for s in self.skipped],
        }

    def accuracy_columns(self) -> list[tuple[str, str]]:
        """(task, metric) of every accuracy-like metric (higher is better), in first-seen order."""
        columns = [(s.task, s.metric) for m in self.models for s in m.tasks if s.metric not in LOWER_IS_BETTER]
        return list(dict.fromkeys(columns))

    def runtimes(self) -> list[str]:
        """The runtimes that measured at least one model."""
        return list(dict.fromkeys(r.runtime for m in self.models for r in m.speed))


def family_report(
    folder: str | Path,
    settings: ReportSettings = ReportSettings(),  # noqa: B008  (frozen, so never mutated)
    progress: bool = False,
) -> FamilyReport:
    """Measures the parent and every member of the family in `folder` (see the module).

    Raises CheckpointError for a folder that is not a complete family or whose parent cannot be
    found, TaskError for an unknown task and DataError for an unreadable text, before any model
    is loaded.
    """
    folder = Path(folder)
    parent_ref = family_parent(folder)
    members = family_members(folder)
    if settings.tasks:
        require("lm_eval", "a report with tasks")
        from anyshape.evaluate.harness import find_tasks

        find_tasks(settings.tasks, settings.include_path)
    text = load_text(settings.data)
    zero_shot = zero_shot_shapes(folder)
    rows = [_Row("parent", parent_ref, "parent")]
    for name, path in members:
        rows.append(_Row(name, str(path), "member"))
        if name in zero_shot:
            rows.append(_Row(f"{name} zero-shot", parent_ref, "zero-shot", zero_shot[name]))
    stages = ["perplexity"] + ["tasks"] * bool(settings.tasks) + ["speed"] * (settings.speed is not None)
    reports, skipped = [], []
    with tqdm(total=len(rows) * len(stages), desc="report", unit="stage", disable=not progress) as bar:

        def stage(message: str) -> None:
            bar.set_description(f"report {message}")

        for row in rows:
            report, left_out = _measure(row, folder, text, settings, progress, stage, bar.update)
            reports.append(report)
            skipped += left_out
    return FamilyReport(str(folder), parent_ref, settings, reports, skipped)


@dataclass(frozen=True)
class _Row:
    """One model of the report: a stored model (`ref`), or a Shape of the sorted parent `ref`."""

    name: str
    ref: str
    role: str  # "parent", "member" or "zero-shot"
    shape: Shape | None = None  # zero-shot: the Shape of the sorted parent


def zero_shot_shapes(folder: Path) -> dict[str, Shape]:
    """Member folder -> the zero-shot Shape its summary.json records (none for an untrained family)."""
    summary = json.loads((folder / FAMILY_SUMMARY).read_text())
    config = load_config(summary["model"])
    return {
        member["folder"]: Shape.from_dict(member["zero_shot"]["shape"], config)
        for member in summary["members"]
        if "zero_shot" in member
    }


def _sorted_parent(folder: Path, parent_ref: str) -> ElasticLlama:
    """The parent sorted by the family's importance scores: what the zero-shot Shapes slice."""
    parent = load(parent_ref)
    sort_(parent, Scores.load(StageCache(folder / "stages").path("scores", ".safetensors"), parent.config))
    return parent


def family_parent(folder: Path) -> str:
    """The parent model reference in a family's summary.json, checked to exist."""
    summary = folder / FAMILY_SUMMARY
    if not summary.is_file():
        what = "a model folder" if (folder / "config.json").is_file() else "not a family folder"
        raise CheckpointError(
            f"{folder} is {what}: it has no {FAMILY_SUMMARY}. A family folder is what "
            "`anyshape compress MODEL --out FAMILY` writes (one Hugging Face folder per member and a "
            f"{FAMILY_SUMMARY} that lists them); make one with `anyshape compress smollm2-135m --out family`"
        )
    try:
        parent = json.loads(summary.read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{summary} names no parent model ({type(error).__name__}: {error}); re-run `anyshape compress`"
        ) from None
    try:
        resolve(parent)
    except CheckpointError as error:
        raise CheckpointError(f"cannot find the family's parent, named in {summary}: {error}") from None
    return str(parent)


def weight_files(path: Path) -> list[Path]:
    """The files that hold a model's weights: a `.gguf` file itself, or a folder's `*.safetensors`."""
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def _measure(
    row: _Row,
    folder: Path,
    text: str,
    settings: ReportSettings,
    progress: bool,
    stage: Callable[[str], None],
    done: Callable[[int], Any],
) -> tuple[ModelReport, list[Skipped]]:
    """One model's row; `stage` is told what runs, `done` counts finished stages."""
    name, ref = row.name, row.ref
    config = load_config(ref)
    shape = row.shape or Shape.full(config)
    files = weight_files(resolve(ref)) if row.shape is None else []
    model = load(ref) if row.shape is None else _sorted_parent(folder, ref)
    tokenizer = load_tokenizer(ref)
    stage(f"{name}: perplexity")
    result = perplexity(model, tokenize(tokenizer, text, settings.max_tokens), row.shape, progress=progress)
    done(1)
    scores, samples = [], {}
    if settings.tasks:
        stage(f"{name}: tasks")
        from anyshape.evaluate.harness import evaluate_tasks

        tasks = evaluate_tasks(
            model, tokenizer, row.shape, settings.tasks, settings.include_path, settings.limit, settings.batch_size
        )
        scores, samples = tasks.scores, tasks.samples
        done(1)
    del model  # the speed benchmark loads each runtime's own copy
    speed, skipped = [], []
    if settings.speed is not None:
        speed, skipped = benchmark(ref, row.shape, settings.speed, settings.runtimes, name, log=stage)
        done(1)
    report = ModelReport(
        name=name,
        role=row.role,
        reference=ref,
        shape=describe(shape.to_dict()),
        num_parameters=shape.num_parameters(config),
        num_parameters_non_embedding=shape.num_parameters(config, embeddings=False),
        file_bytes=sum(path.stat().st_size for path in files),
        weight_files=[path.name for path in files],
        perplexity=result,
        tasks=scores,
        samples=samples,
        speed=speed,
    )
    return report, skipped


def report_files(out: str | Path) -> tuple[Path, Path, Path]:
    """The markdown report `out` and, beside it, its JSON and PNG (same name, other suffix)."""
    out = Path(out)
    return out, out.with_suffix(".json"), out.with_suffix(".png")


def write_family_report(report: FamilyReport, out: str | Path, overwrite: bool = False) -> tuple[Path, Path, Path]:
    """Writes `out` (markdown: notes and one table), its JSON and its PNG of plots, atomically
    (no file is ever half-written); existing files are replaced only with `overwrite`. Returns
    the three paths."""
    paths = report_files(out)
    with atomic_files(paths, overwrite) as (markdown, record, plot):
        plot_family_report(report, plot)
        record.write_text(_json(report.to_dict()))
        markdown.write_text(markdown_report(report, paths[2].name))
    return paths


def markdown_report(report: FamilyReport, plot_name: str) -> str:
    """The report as markdown: what was measured, the table, and the plot image."""
    settings, parent = report.settings, report.models[0]
    data = settings.data or DEFAULT_TEXT_NAME
    lines = [
        f"# Deployment report: {report.family}",
        "",
        f"The parent `{report.parent}` and the {sum(m.role == 'member' for m in report.models)} members of the "
        "family, each measured as it is stored.",
        "",
        "- **Parameters**: total, and non-embedding (without the embedding and LM-head matrices).",
        "- **File**: the weight files on disk, in MB (10^6 bytes), and bytes per parameter; members: their "
        f"`*.safetensors`; the parent: its source ({', '.join(parent.weight_files)}).",
        f"- **Perplexity**: `{data}`, at most its first {settings.max_tokens:,} tokens ({parent.perplexity.tokens:,} "
        f"scored) in windows of {parent.perplexity.window} every {parent.perplexity.stride} tokens, exp(mean "
        "negative log-likelihood), as `anyshape evaluate --ppl`.",
    ]
    if settings.tasks:
        documents = f"the first {settings.limit}" if settings.limit else "all"
        lines.append(
            f"- **Tasks**: lm-eval, zero-shot, {documents} documents of each task "
            f"({', '.join(f'{task} {n}' for task, n in parent.samples.items())}); value ± standard error."
        )
    if settings.speed is not None:
        s = settings.speed
        lines.append(
            f"- **Speed**: batch 1 on {os.cpu_count()} CPU cores, {s.threads} threads: {s.prompt_tokens} prompt "
            f"tokens in one forward (prefill), then {s.gen_tokens} tokens one at a time through the KV cache "
            f"(decode); tokens/s, the median of {s.repeats} repeats after {s.warmup} warm-up (min and max in the "
            "JSON). Peak memory: the resident-set growth while the runtime loads and runs, MiB. "
            f"llama.cpp runs a {s.gguf_type} GGUF export, the torch runtimes float32."
        )
    if any(m.role == "zero-shot" for m in report.models):
        lines.append(
            "- **Zero-shot rows**: the members were trained; each is followed by the Shape the search chose before "
            "training, sliced from the sorted parent without training (no file of its own; its speed is the "
            "parent's at that Shape). The plot shows the members."
        )
    lines += ["", *_table(report), ""]
    lines += [f"Skipped {s.runtime} on {s.model}: {s.reason}" for s in report.skipped]
    lines += ["", f"![accuracy, perplexity and speed against parameters]({plot_name})", ""]
    return "\n".join(lines)


def _table(report: FamilyReport) -> list[str]:
    header = ["model", "Shape", "parameters", "non-embedding", "file MB", "bytes/param", "perplexity"]
    header += [f"{task} {metric}" for task, metric in report.accuracy_columns()]
    for runtime in report.runtimes():
        header += [f"prefill tok/s ({runtime})", f"decode tok/s ({runtime})", f"peak MiB ({runtime})"]
    rows = [header, ["---", "---"] + ["---:"] * (len(header) - 2)]
    for m in report.models:
        row = [
            f"parent ({m.reference})" if m.role == "parent" else m.name,
            m.shape,
            f"{m.num_parameters:,}",
            f"{m.num_parameters_non_embedding:,}",
            f"{m.file_bytes / 1e6:.1f}" if m.weight_files else "-",
            f"{m.file_bytes / m.num_parameters:.2f}" if m.weight_files else "-",
            _perplexity(m.perplexity.perplexity),
        ]
        for task, metric in report.accuracy_columns():
            score = m.score(task, metric)
            row.append("-" if score is None else _with_stderr(score))
        for runtime in report.runtimes():
            result = m.speed_in(runtime)
            if result is None:
                row += ["-", "-", "-"]
                continue
            memory = "n/a" if result.peak_rss_mib is None else f"{result.peak_rss_mib:.0f}"
            row += [f"{result.prefill.median:.1f}", f"{result.decode.median:.1f}", memory]
        rows.append(row)
    return ["| " + " | ".join(row) + " |" for row in rows]


def _perplexity(value: float) -> str:
    """Two decimals; in scientific notation from a million on."""
    return f"{value:.2f}" if value < 1e6 else f"{value:.3e}"


def _with_stderr(score: TaskScore) -> str:
    return f"{score.value:.3f}" if score.stderr is None else f"{score.value:.3f} ± {score.stderr:.3f}"


def plot_family_report(report: FamilyReport, path: str | Path) -> None:
    """One PNG, a panel each: accuracy (if tasks ran; standard-error bars), perplexity (log
    scale) and decode tokens/s (if speed was measured; min-max bars) against total parameters,
    one line per metric or runtime; the parent is a star."""
    matplotlib = require("matplotlib", "the report's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted((m for m in report.models if m.role != "zero-shot"), key=lambda m: m.num_parameters)
    panels: list[tuple[str, dict[str, list[Point | None]]]] = []
    if report.accuracy_columns():
        series = {
            f"{task} {metric}": [_accuracy(m.score(task, metric)) for m in ordered]
            for task, metric in report.accuracy_columns()
        }
        panels.append(("accuracy", series))
    panels.append(("perplexity", {"perplexity": [(m.perplexity.perplexity, 0.0, 0.0) for m in ordered]}))
    if report.runtimes():
        panels.append(("decode tokens/s", {r: [_decode(m.speed_in(r)) for m in ordered] for r in report.runtimes()}))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (label, series) in zip(axes[0], panels, strict=True):
        for index, (name, points) in enumerate(series.items()):
            kept = [(m.num_parameters / 1e6, point, m) for m, point in zip(ordered, points, strict=True) if point]
            xs, ys = [x for x, _, _ in kept], [point[0] for _, point, _ in kept]
            errors = [[point[1] for _, point, _ in kept], [point[2] for _, point, _ in kept]]
            axis.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
            for x, (y, _, _), m in kept:
                if m.role == "parent":
                    axis.plot(x, y, marker="*", markersize=14, color="black", zorder=3)
                if index == 0:  # name each model once per panel
                    axis.annotate("parent" if m.role == "parent" else m.name, (x, y), fontsize=8,
                                  xytext=(4, 4), textcoords="offset points")  # fmt: skip
        if label == "perplexity":
            axis.set_yscale("log")
        axis.set_xlabel("parameters (millions)")
        axis.set_ylabel(label)
        axis.set_title(f"{label} vs parameters")
        if len(series) > 1:
            axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")
    plt.close(figure)


def _accuracy(score: TaskScore | None) -> Point | None:
    return None if score is None else (score.value, score.stderr or 0.0, score.stderr or 0.0)


def _decode(result: SpeedResult | None) -> Point | None:
    if result is None:
        return None
    rate = result.decode
    return rate.median, rate.median - rate.min, rate.max - rate.median


def _json(record: dict[str, Any]) -> str:
    return json.dumps(record, indent=2) + "\n"
