"""Zero-shot accuracy through lm-eval (the lm-evaluation-harness), for any Shape, in memory.

`ShapeLM` is lm-eval's view of an ElasticLlama running one Shape: nothing is exported to disk.
It scores requests exactly as lm-eval's own `hf` model (`HFLM`) does, so the two give the same
accuracy on the same checkpoint:
  - text is tokenized by `TemplateLM` (the context's trailing spaces move to the continuation,
    the continuation's tokens are those the whole string adds to the context's, an empty context
    becomes the BOS token, else EOS), with the tokenizer's own special-token default;
  - requests are sorted longest first and batched by `batch_size`, right-padded; requests that
    share their context and all but the last continuation token share one forward pass;
  - inputs longer than the model's context are cut from the left.
Generation is greedy, with a KV cache: the context runs once, then one token per step.

`evaluate_tasks` runs lm-eval tasks by name, built into lm-eval or defined by YAML files in a
folder of your own (`include_path`), and returns each metric with its standard error.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import glob
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import DataError, TaskError, first_line
from anyshape.evaluate import BATCH_SIZE
from anyshape.model.llama import ElasticLlama, KVCache
from anyshape.shape import Shape

MAX_GEN_TOKS = 256  # HFLM's default generation budget, in tokens
DEFAULT_MAX_LENGTH = 2048  # HFLM's context length for a config that states none

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings, context ids, continuation ids)


class ShapeLM(TemplateLM):
    """An lm-eval language model: `model` running `shape` (None: the full model), with `tokenizer`.

    Args:
        batch_size: requests per forward pass in log-likelihood scoring.
        max_length: context length in tokens; default: the config's `max_position_embeddings`.
    """

    def __init__(
        self,
        model: ElasticLlama,
        tokenizer: PreTrainedTokenizerBase,
        shape: Shape | None = None,
        batch_size: int = BATCH_SIZE,
        max_length: int | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise TaskError(f"batch_size={batch_size} must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.shape = (shape or model.full_shape).validate(model.config)
        self.batch_size = batch_size
        self.max_length = max_length or getattr(model.config.hf, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH
        self._device = next(model.parameters()).device

    @property
    def eot_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """The token that stands for an empty context: BOS, else EOS (as HFLM)."""
        for token in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token is not None:
                return token
        raise TaskError(
            "the tokenizer has neither a BOS nor an EOS token, so a continuation with an empty "
            "context cannot be scored; use a task whose prompts are not empty"
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of `string`; by default with the tokenizer's own special tokens, unless
        `string` already starts with the prefix token (HFLM's rule)."""
        if add_special_tokens is None and self._starts_with_prefix(string):
            add_special_tokens = False
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def _starts_with_prefix(self, string: str) -> bool:
        prefix = self.tokenizer.bos_token or self.tokenizer.eos_token
        return bool(prefix) and string.startswith(prefix)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-probability of the continuation in nats, whether greedy decoding gives it), per
        request, in the order given."""

        def longest_first(request: Request) -> tuple[int, tuple[int, ...]]:
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        def model_input(request: Request) -> list[int]:  # what the model reads to score it
            return request[1] + request[2][:-1]

        ordered = Collator(requests, sort_fn=longest_first, group_by="contexts", group_fn=model_input)
        results: list[tuple[float, bool]] = []
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm) as bar:
            for batch in ordered.get_batched(n=self.batch_size):
                inputs = [model_input(request)[-self.max_length :] for request in batch]
                ids = torch.zeros(len(inputs), max(map(len, inputs)), dtype=torch.long)  # (B, T), right-padded
                for row, tokens in enumerate(inputs):
                    ids[row, : len(tokens)] = torch.tensor(tokens)
                hidden = self.model.hidden_states(ids.to(self._device), self.shape)  # (B, T, H')
                for (strings, context, continuation), tokens, row_hidden in zip(batch, inputs, hidden, strict=True):
                    # Only the positions that predict the continuation go through the LM head.
                    predicting = row_hidden[len(tokens) - len(continuation) : len(tokens)]  # (C, H')
                    logits = self.model.lm_head_logits(predicting, self.shape).float()  # (C, V)
                    scored = F.log_softmax(logits, dim=-1)[None]  # (1, C, V)
                    # Requests that share this input (other last tokens) are answered from it too.
                    for _, shared_continuation, shared_scored in ordered.get_cache(
                        req_str=strings, cxt_toks=context, cont_toks=continuation, logits=scored
                    ):
                        results.append(self._score(shared_scored, shared_continuation))
                        bar.update(1)
        return ordered.get_original(results)

    def _score(self, log_probs: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """log_probs (1, >= C, V) whose last C rows predict the C continuation tokens."""
        target = torch.tensor(continuation, device=log_probs.device)[None]  # (1, C)
        log_probs = log_probs[:, -len(continuation) :]  # (1, C, V)
        greedy = bool((log_probs.argmax(dim=-1) == target).all())
        return float(log_probs.gather(2, target[..., None]).sum()), greedy

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood (nats) of each whole text after the prefix token, in windows of at most
        `max_length` tokens that predict every token once (lm-eval's rolling windows)."""
        owners: list[int] = []
        windows: list[Request] = []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                owners.append(index)
                windows.append((None, context, continuation))
        totals = [0.0] * len(requests)
        for index, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[index] += log_prob
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut before the first stop string (`until`), at
        most `max_gen_toks` tokens, ended early by the EOS token."""
        return [
            self._generate(context, dict(options))
            for context, options in tqdm([r.args for r in requests], desc="generate", disable=disable_tqdm)
        ]

    @torch.no_grad()
    def _generate(self, context: str, options: dict[str, Any]) -> str:
        if options.get("do_sample"):
            raise TaskError("a task asks for sampled generation (do_sample: true); anyshape generates greedily only")
        until = options.get("until") or []
        stops = [until] if isinstance(until, str) else [stop for stop in until if stop]
        max_new = int(options.get("max_gen_toks", MAX_GEN_TOKS))
        budget = self.max_length - max_new  # context tokens that leave room for the generation
        if budget < 1:
            raise TaskError(
                f"max_gen_toks={max_new} leaves no room for a context in {self.max_length} tokens; "
                "lower the task's max_gen_toks"
            )
        cache = KVCache(self.shape)
        new_tokens = self.tok_encode(context)[-budget:]  # the context, then one token at a time
        generated: list[int] = []
        text = ""
        while len(generated) < max_new and not any(stop in text for stop in stops):
            hidden = self.model.hidden_states(torch.tensor([new_tokens], device=self._device), self.shape, cache)
            token = int(self.model.lm_head_logits(hidden[0, -1], self.shape).argmax())
            if token == self.eot_token_id:
                break
            generated.append(token)
            new_tokens = [token]
            text = self.tokenizer.decode(generated, skip_special_tokens=True)
        for stop in stops:
            text = text.split(stop)[0]
        return text


@dataclass(frozen=True)
class TaskScore:
    task: str
    metric: str  # lm-eval's name, e.g. "acc", "acc_norm", "perplexity"; ",filter" unless "none"
    value: float
    stderr: float | None  # standard error of `value`; None where lm-eval gives none


@dataclass(frozen=True)
class TaskResults:
    scores: list[TaskScore]
    samples: dict[str, int]  # documents evaluated per task

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [asdict(score) for score in self.scores], "samples": self.samples}

    @classmethod
    def from_lm_eval(cls, output: dict[str, Any]) -> TaskResults:
        """Reads `simple_evaluate`'s output: results[task]["acc,none"], ["acc_stderr,none"], ..."""
        scores = []
        for task, metrics in output["results"].items():
            for key, value in metrics.items():
                name, _, filter_name = key.partition(",")
                if not filter_name or name.endswith("_stderr") or not isinstance(value, int | float):
                    continue  # "alias", and the standard errors, read beside their metric
                stderr = metrics.get(f"{name}_stderr,{filter_name}")
                scores.append(
                    TaskScore(
                        task=task,
                        metric=name if filter_name == "none" else key,
                        value=float(value),
                        stderr=float(stderr) if isinstance(stderr, int | float) else None,
                    )
                )
        samples = {task: int(counts["effective"]) for task, counts in output.get("n-samples", {}).items()}
        return cls(scores, samples)


@dataclass(frozen=True)
class TaskSuite:
    """lm-eval tasks checked to exist, and the working directory they are to be run from."""

    names: tuple[str, ...]
    manager: TaskManager
    data_folder: Path  # where the tasks' relative `data_files` are found


def find_tasks(names: Sequence[str], include_path: str | Path | None = None) -> TaskSuite:
    """The tasks called `names`, in lm-eval or among the YAML files under `include_path`.

    lm-eval reads a task YAML's relative `dataset_kwargs.data_files` from the working directory.
    So that a task folder works from anywhere, they are looked for in the working directory, then
    beside the task's YAML, then in its parent folder, and the tasks run from the first of those
    that holds them all. Raises TaskError for an unknown name (naming the closest ones) and
    DataError for a missing folder or data file.
    """
    names = tuple(dict.fromkeys(names))
    if not names:
        raise TaskError("no task given; name lm-eval tasks such as hellaswag,lambada_openai")
    folder = _include_folder(include_path)
    manager = _task_manager(folder)
    known = manager.all_tasks
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            where = (
                f"lm-eval or {folder}"
                if folder
                else "lm-eval (for tasks of your own, pass their folder as include path)"
            )
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise TaskError(f"unknown task {name!r}: not in {where}{hint}")
    return TaskSuite(names, manager, _data_folder(names, folder))


def evaluate_tasks(
    model: ElasticLlama,
    tokenizer: PreTrainedTokenizerBase,
    shape: Shape | None,
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = BATCH_SIZE,
) -> TaskResults:
    """Zero-shot lm-eval `tasks` on `model` at `shape` (None: the full model).

    Args:
        include_path: a folder of task YAML files of your own, searched besides lm-eval's tasks.
        limit: evaluate only the first `limit` documents of each task (None: all of them).
        batch_size: requests per forward pass.

    As lm-eval's own command does, this seeds Python's, NumPy's and torch's random generators.
    """
    if limit is not None and limit < 1:
        raise TaskError(f"limit={limit} must be at least 1 document per task; omit it to use every document")
    suite = find_tasks(tasks, include_path)
    lm = ShapeLM(model, tokenizer, shape, batch_size)
    # lm-eval prints progress notes on stdout: they go to stderr, beside the progress bars.
    with _working_directory(suite.data_folder), contextlib.redirect_stdout(sys.stderr):
        try:
            output = simple_evaluate(
                model=lm, tasks=list(suite.names), task_manager=suite.manager, limit=limit, log_samples=False
            )
        except ConnectionError as error:  # a task whose dataset lives on the Hugging Face Hub
            raise DataError(
                f"a task's dataset could not be read ({first_line(error)}): lm-eval's own tasks fetch "
                "theirs from the Hugging Face Hub, which is not reachable; use a local copy of the task "
                "(a YAML with local data_files, in an include path)"
            ) from None
    return TaskResults.from_lm_eval(output)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: Path | None) -> TaskManager:
    """lm-eval's index of its own tasks and those under `include_path` (built once: seconds)."""
    return TaskManager(include_path=str(include_path) if include_path else None)


def _include_folder(include_path: str | Path | None) -> Path | None:
    if include_path is None:
        return None
    folder = Path(include_path).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"include path {str(include_path)!r} is not a folder; pass the folder of your task YAML files")
    if not any(folder.rglob("*.yaml")):
        raise DataError(f"include path {folder} holds no .yaml task files")
    return folder


def _data_folder(names: tuple[str, ...], include_folder: Path | None) -> Path:
    """The first of the working directory and, for each named task of `include_folder`, its YAML's
    folder and that folder's parent, that holds every relative data file of those tasks."""
    needed = [
        (yaml_path, data_file)
        for yaml_path, config in _task_yamls(include_folder)
        if config.get("task") in names
        for data_file in _relative_data_files(config)
    ]
    candidates = [Path.cwd()]
    for yaml_path, _ in needed:
        candidates += [yaml_path.parent, yaml_path.parent.parent]
    candidates = list(dict.fromkeys(candidates))
    for candidate in candidates:
        if all(glob.glob(str(candidate / data_file)) for _, data_file in needed):
            return candidate
    folders = ", ".join(map(str, candidates))
    for yaml_path, data_file in needed:
        if not any(glob.glob(str(candidate / data_file)) for candidate in candidates):
            raise DataError(
                f"{yaml_path.name} reads data file {data_file!r}, which is in none of {folders}; "
                "put it beside the YAML or make its path absolute"
            )
    raise DataError(
        f"the data files of tasks {', '.join(names)} are in different folders, but one run reads "
        f"relative paths from one folder (tried {folders}); evaluate those tasks separately"
    )


def _task_yamls(folder: Path | None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(path, config) of every task YAML file under `folder`, includes merged in."""
    for path in sorted(folder.rglob("*.yaml")) if folder else ():
        config = _read_yaml(path)
        if isinstance(config, dict):
            yield path, config


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs as data, leaving tags such as `!function` unresolved (None)."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def _read_yaml(path: Path, seen: frozenset[Path] = frozenset()) -> Any:
    """A task YAML with its `include:` files merged under it, as lm-eval merges them; None for
    a file that cannot be read, or that includes itself."""
    path = path.resolve()
    if path in seen:
        return None
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # lm-eval skips such files too
    if not isinstance(config, dict) or "include" not in config:
        return config
    includes = config.pop("include")
    merged: dict[str, Any] = {}
    for include in includes if isinstance(includes, list) else [includes]:
        base = _read_yaml(path.parent / include, seen | {path})
        merged.update(base if isinstance(base, dict) else {})
    return merged | config


def _relative_data_files(config: dict[str, Any]) -> list[str]:
    """The relative local paths among a task config's `dataset_kwargs.data_files`."""
    data_files = (config.get("dataset_kwargs") or {}).get("data_files") or []
    if isinstance(data_files, dict):
        data_files = list(data_files.values())
    entries = []
    for entry in data_files if isinstance(data_files, list) else [data_files]:
        entries += entry if isinstance(entry, list) else [entry]
    return [entry for entry in entries if "://" not in entry and not Path(entry).expanduser().is_absolute()]


@contextlib.contextmanager
def _working_directory(folder: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)
