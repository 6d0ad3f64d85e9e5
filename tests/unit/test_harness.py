"""Zero-shot evaluation through lm-eval: a Shape scores requests as lm-eval's own `hf` model
scores its extracted checkpoint, a task's accuracy is the one a direct computation gives, and the
command reports it (or refuses bad input with one line, exit 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM

import anyshape
from anyshape import DataError, Shape, export_hf
from anyshape.errors import TaskError
from anyshape.evaluate.harness import ShapeLM, evaluate_tasks, find_tasks
from tests.conftest import byte_tokenizer
from tests.unit.test_cli import assert_bad_input, run, text_file

PARENT = "llama3-gqa"  # 4 layers, hidden 64, 8 query heads in 2 KV groups, MLP 96, context 256
SHAPE = {"layers": [0, 2, 3], "hidden_size": 48, "num_attention_heads": 4, "intermediate_size": 64}
DOCS = [  # choices of unequal lengths, so that acc and acc_norm can differ
    {"question": "What do cats chase?", "choices": ["mice", "the moon", "taxes"], "label": 0},
    {"question": "Which is a colour?", "choices": ["seven", "green", "loud", "a long walk home"], "label": 1},
    {"question": "What falls in winter?", "choices": ["snow", "prices"], "label": 0},
    {"question": "Where do fish live?", "choices": ["in trees", "in water", "on the sun"], "label": 1},
    {"question": "What is two plus two?", "choices": ["three", "five", "four"], "label": 2},
]
TASK_YAML = """
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data_file}
validation_split: validation
doc_to_text: "Q: {{{{question}}}}\\nA:"
"""
CHOICE = """output_type: multiple_choice
doc_to_target: label
doc_to_choice: choices
metric_list: [{metric: acc}, {metric: acc_norm}]
"""
ANSWER = """output_type: loglikelihood
doc_to_target: "{{' ' + choices[label]}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
"""


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory) -> Path:
    """eval/tasks/, a task folder: `beside_choice` reads beside.jsonl beside its YAML;
    `parent_choice` and `parent_answer` (the right answer's log-likelihood) read parent.jsonl
    from eval/, the layout of ../shared/data/eval, and so does `included_choice`, by its
    template; `missing_choice` reads a file that exists nowhere."""
    root = tmp_path_factory.mktemp("eval")
    folder = root / "tasks"
    folder.mkdir()
    lines = "".join(json.dumps(doc) + "\n" for doc in DOCS)
    (folder / "beside.jsonl").write_text(lines)
    (root / "parent.jsonl").write_text(lines)
    for name, data_file, kind in [
        ("beside_choice", "beside.jsonl", CHOICE),
        ("parent_choice", "parent.jsonl", CHOICE),
        ("parent_answer", "parent.jsonl", ANSWER),
        ("missing_choice", "missing.jsonl", CHOICE),
    ]:
        (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data_file=data_file) + kind)
    # `included_choice` takes everything but its name from a template, as lm-eval's task families do
    (folder / "_template_yaml").write_text(TASK_YAML.format(name="template", data_file="parent.jsonl") + CHOICE)
    (folder / "included_choice.yaml").write_text("include: _template_yaml\ntask: included_choice\n")
    return folder


@pytest.fixture(scope="module")
def parent(tiny_dir):
    return anyshape.load(tiny_dir(PARENT))


@pytest.fixture(scope="module")
def shape(parent) -> Shape:
    return Shape.from_dict(SHAPE, parent.config)


@pytest.fixture(scope="module")
def tokenizer():
    """The byte tokenizer, with a newline as EOS: the prefix of an empty context."""
    tokenizer = byte_tokenizer()
    tokenizer.eos_token = "\u010a"  # the byte-level symbol of "\n"
    return tokenizer


@torch.no_grad()
def log_likelihood(model, tokenizer, shape, context: str, continuation: str) -> tuple[float, bool]:
    """(log-probability of `continuation` after `context`, whether each of its tokens is the
    most likely one), from one forward pass over both."""
    ids = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    log_probs = F.log_softmax(model(torch.tensor([ids]), shape)[0], dim=-1)  # (T, V)
    predicted = log_probs[start - 1 : len(ids) - 1]  # (C, V), the rows that predict the continuation
    targets = torch.tensor(ids[start:])
    return predicted.gather(1, targets[:, None]).sum().item(), bool((predicted.argmax(-1) == targets).all())


def prompt(doc: dict) -> str:
    return f"Q: {doc['question']}\nA:"


def reference_accuracy(model, tokenizer, shape, docs) -> tuple[float, float]:
    """(acc, acc_norm) of choosing the choice of highest log-likelihood; acc_norm divides it by
    the choice's length in characters."""
    acc = acc_norm = 0
    for doc in docs:
        scores = [log_likelihood(model, tokenizer, shape, prompt(doc), f" {choice}")[0] for choice in doc["choices"]]
        normed = [score / len(choice) for score, choice in zip(scores, doc["choices"], strict=True)]
        acc += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
        acc_norm += max(range(len(normed)), key=normed.__getitem__) == doc["label"]
    return acc / len(docs), acc_norm / len(docs)


def reference_answers(model, tokenizer, shape, docs) -> tuple[float, float]:
    """(perplexity, acc) of the right answers: exp(-mean log-likelihood), and the fraction that
    greedy decoding would give."""
    scored = [log_likelihood(model, tokenizer, shape, prompt(doc), f" {doc['choices'][doc['label']]}") for doc in docs]
    return math.exp(-sum(ll for ll, _ in scored) / len(docs)), sum(greedy for _, greedy in scored) / len(docs)


@pytest.mark.parametrize(("task", "limit"), [("beside_choice", None), ("parent_choice", 3)])
def test_accuracy_equals_a_direct_computation(
    parent, shape, tokenizer, task_folder, tmp_path, monkeypatch, task, limit
):
    monkeypatch.chdir(tmp_path)  # anywhere: relative data files are found beside the YAML or above it
    results = evaluate_tasks(parent, tokenizer, shape, [task], task_folder, limit=limit, batch_size=3)
    docs = DOCS[:limit]
    acc, acc_norm = reference_accuracy(parent, tokenizer, shape, docs)
    scores = {score.metric: score for score in results.scores if score.task == task}
    assert (scores["acc"].value, scores["acc_norm"].value) == (acc, acc_norm)
    # lm-eval's standard error of a mean of 0/1 outcomes: the sample standard deviation / sqrt(n)
    n = len(docs)
    assert scores["acc"].stderr == pytest.approx(math.sqrt(acc * (1 - acc) / (n - 1)))
    assert results.samples == {task: n}
    assert Path.cwd() == tmp_path


def hflm_of_extracted(parent, shape, tokenizer, folder: Path, batch_size: int) -> HFLM:
    """lm-eval's own `hf` model of the Shape's exported checkpoint."""
    export_hf(parent, shape, folder, tokenizer=tokenizer)
    return HFLM(pretrained=str(folder), device="cpu", dtype="float32", batch_size=batch_size)


def requests(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(kind, doc={}, arguments=args, idx=index) for index, args in enumerate(arguments)]


def test_a_shape_scores_as_lm_eval_scores_its_extracted_model(parent, shape, tokenizer, tmp_path):
    ours = ShapeLM(parent, tokenizer, shape, batch_size=3)
    theirs = hflm_of_extracted(parent, shape, tokenizer, tmp_path / "small", batch_size=3)
    pairs = [
        ("Q: What do cats chase?\nA:", " mice"),
        ("Q: What do cats chase?\nA:", " the moon"),
        ("The answer is", "A"),  # one-token continuations of one context: one forward pass
        ("The answer is", "B"),
        ("A context that ends in spaces  ", "moves them to the continuation"),
        ("", "an empty context is the prefix token"),
        ("x" * 300, " longer than the 256-token context: cut from the left"),
    ]
    for (our_log_prob, our_greedy), (their_log_prob, their_greedy) in zip(
        ours.loglikelihood(requests("loglikelihood", pairs)),
        theirs.loglikelihood(requests("loglikelihood", pairs)),
        strict=True,
    ):
        assert our_log_prob == pytest.approx(their_log_prob, abs=1e-3)
        assert our_greedy == their_greedy
    texts = [("A short text.",), ("Several windows of the model's context. " * 20,)]  # 800 tokens
    torch.testing.assert_close(
        torch.tensor(ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts)), dtype=torch.float64),
        torch.tensor(theirs.loglikelihood_rolling(requests("loglikelihood_rolling", texts)), dtype=torch.float64),
        atol=1e-2,
        rtol=1e-5,
    )


@torch.no_grad()
def test_generation_is_greedy_and_stops_at_the_stop_string(parent, shape, tokenizer, tmp_path):
    export_hf(parent, shape, tmp_path / "small", tokenizer=tokenizer)
    reference_model = AutoModelForCausalLM.from_pretrained(tmp_path / "small").eval()
    context = "Q: What do cats chase?\nA:"
    ids = tokenizer.encode(context)
    for _ in range(12):  # greedy decoding of the extracted model, stopped at EOS
        token = int(reference_model(torch.tensor([ids])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
    reference = tokenizer.decode(ids[len(tokenizer.encode(context)) :])
    assert len(reference) >= 6, "the test needs a longer generation to pick a stop string from"
    stop = reference[3:5]
    ours = ShapeLM(parent, tokenizer, shape)
    generated = ours.generate_until(
        requests(
            "generate_until",
            [(context, {"until": [], "max_gen_toks": 12}), (context, {"until": [stop], "max_gen_toks": 12})],
        )
    )
    assert generated == [reference, reference.split(stop)[0]]


@pytest.mark.parametrize(
    ("tasks", "folder"),
    [(["beside_choice"], "tasks"), (["parent_choice", "parent_answer"], "eval"), (["included_choice"], "eval")],
)
def test_tasks_run_where_their_data_files_are(task_folder, tmp_path, monkeypatch, tasks, folder):
    monkeypatch.chdir(tmp_path)
    assert find_tasks(tasks, task_folder).data_folder == {"tasks": task_folder, "eval": task_folder.parent}[folder]
    monkeypatch.chdir(task_folder.parent)  # lm-eval's own rule first: the working directory
    assert find_tasks(["parent_choice"], task_folder).data_folder == task_folder.parent


def test_unknown_task_names_the_closest(task_folder):
    with pytest.raises(TaskError, match="unknown task 'beside_choise'.*beside_choice"):
        find_tasks(["beside_choise"], task_folder)


def test_data_files_in_different_folders_cannot_share_a_run(task_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="different folders"):
        find_tasks(["beside_choice", "parent_choice"], task_folder)


# ------------------------------------------------------------------ the command


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--tasks", "beside_choise", "--include-path", "TASKS"], ["unknown task", "beside_choice"]),
        (["--tasks", "missing_choice", "--include-path", "TASKS"], ["missing.jsonl", "in none of"]),
        (["--tasks", "beside_choice", "--include-path", "NOWHERE"], ["include path", "not a folder"]),
        (["--tasks", "beside_choice", "--include-path", "EMPTY"], ["holds no .yaml"]),
        (["--tasks", "beside_choice", "--limit", 0], ["--limit", "greater than or equal to 1"]),
        (["--tasks", ","], ["no task given"]),
        (["--limit", 5], ["--limit applies to --tasks"]),
        (["--include-path", "TASKS"], ["--include-path applies to --tasks"]),
        (["--tasks", "beside_choice", "--include-path", "TASKS", "--data", "TEXT"], ["--data", "--ppl"]),
    ],
    ids=[
        "unknown",
        "missing-data",
        "no-folder",
        "empty-folder",
        "limit-0",
        "no-task",
        "limit-alone",
        "path-alone",
        "data",
    ],
)
def test_bad_task_arguments(capsys, tiny_dir, task_folder, tmp_path, args, words):
    (tmp_path / "empty").mkdir()
    replace = {
        "TASKS": task_folder,
        "NOWHERE": tmp_path / "nowhere",
        "EMPTY": tmp_path / "empty",
        "TEXT": text_file(tmp_path),
    }
    assert_bad_input(capsys, ["evaluate", tiny_dir(PARENT), *[replace.get(arg, arg) for arg in args]], *words)


def test_evaluate_prints_perplexity_and_task_metrics(
    capsys, tiny_dir, task_folder, tmp_path, monkeypatch, hf_perplexity
):
    monkeypatch.chdir(tmp_path)
    folder = tiny_dir(PARENT)
    model, tokenizer = anyshape.load(folder), anyshape.load_tokenizer(folder)
    shape = Shape.from_dict(SHAPE, model.config)
    acc, acc_norm = reference_accuracy(model, tokenizer, shape, DOCS)
    perplexity, answer_acc = reference_answers(model, tokenizer, shape, DOCS)
    tasks = ["--tasks", "parent_choice,parent_answer", "--include-path", task_folder, "--shape", json.dumps(SHAPE)]
    text = ["--ppl", "--data", text_file(tmp_path), "--window", 32, "--max-tokens", 64]
    status, out, err = run(capsys, "evaluate", folder, *tasks, *text, "--json")
    assert status == 0, err
    record = json.loads(out)  # stdout is the result alone, whatever lm-eval prints
    values = {(row["task"], row["metric"]): row["value"] for row in record["tasks"]}
    assert values.pop(("parent_answer", "perplexity")) == pytest.approx(perplexity, rel=1e-4)
    assert values == {
        ("parent_choice", "acc"): acc,
        ("parent_choice", "acc_norm"): acc_norm,
        ("parent_answer", "acc"): answer_acc,
    }
    assert record["samples"] == {"parent_choice": 5, "parent_answer": 5}
    assert record["shape"]["layers"] == SHAPE["layers"]
    anyshape.export_hf(model, shape, tmp_path / "shape", tokenizer=tokenizer)  # the Shape, read by transformers
    reference = hf_perplexity(tmp_path / "shape", text_file(tmp_path).read_text(), window=32, max_tokens=64)
    assert record["perplexity"] == pytest.approx(reference, rel=1e-4)

    status, out, err = run(capsys, "evaluate", folder, *tasks[:4], "--limit", 2)  # tasks alone: a table
    assert status == 0, err
    assert "perplexity  " not in out.split("\n\n")[0]  # no perplexity of a text
    header, *rows = out.split("\n\n")[1].splitlines()
    assert header.split() == ["task", "metric", "value", "stderr"]
    assert [row.split()[:2] for row in rows] == [
        ["parent_choice", "acc"],
        ["parent_choice", "acc_norm"],
        ["parent_answer", "perplexity"],
        ["parent_answer", "acc"],
    ]
    assert len({len(row) for row in [header, *rows]}) == 1  # aligned


def test_eval_is_a_hidden_alias_of_evaluate(capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0 and "\n  evaluate " in out and "\n  eval " not in out
    status, out, _ = run(capsys, "eval", "--help")
    assert status == 0 and "--tasks" in out and "Example: anyshape evaluate" in out
