"""Fuzzing every user-facing parser: each bad input ends in exit status 2 and one line on stderr.

Every generated input is checked twice where a library parser reads it: the parser itself
raises an AnyshapeError (never another exception), and the command refuses it in-process with
`anyshape: error: ...` on one line, no traceback and no output folder. Inputs that happen to be
valid are rejected by the parser's verdict before the command runs (`assume`), so no example
starts real work.
"""

from __future__ import annotations

import itertools
import json
import math
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from anyshape.cli import main
from anyshape.errors import AnyshapeError
from anyshape.importance.rpd import Scheme
from anyshape.importance.scores import Scores
from anyshape.model.load import load_config
from anyshape.prune.target import PruningTarget
from anyshape.search.budget import Budget, parse_anchors
from anyshape.search.space import SearchSpace, parse_fractions
from anyshape.shape import Shape
from anyshape.share.plan import build_plan
from anyshape.train.domains import parse_domains, read_reference_losses
from anyshape.train.settings import TrainSettings, read_settings
from tests.fault import tally

pytestmark = pytest.mark.integration  # hundreds of generated inputs: the fast run leaves them out

TINY = "llama-mha-tied"  # 4 layers, hidden 64, 4 heads in 4 KV groups, MLP 96
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(FUZZ, max_examples=12)
_names = itertools.count()

# ---------------------------------------------------------------- strategies

scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
numbers_as_text = st.one_of(
    st.text(max_size=12),
    st.floats().map(repr),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["", " ", ",", "nan", "inf", "-0", "1e999", "0x10", "1_000", "½", "٣", "1,,2", "0.5M", "--1"]),
)
int_fields = st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6) | st.booleans() | st.none()


def examples(name: str, values: list[Any]):
    """Runs each of `values` as the argument `name` on every run, besides what hypothesis draws."""

    def decorate(test):
        for value in values:
            test = example(**{name: value})(test)
        return test

    return decorate


def field_dicts(fields: tuple[str, ...]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts of known fields with arbitrary values, sometimes with an unknown field too."""
    known = st.fixed_dictionaries({}, optional=dict.fromkeys(fields, json_values | int_fields))
    unknown = st.dictionaries(st.text(max_size=8), json_values, max_size=2)
    return st.one_of(known, st.builds(lambda a, b: {**a, **b}, known, unknown))


def _encoded(value: Any) -> bytes:
    return json.dumps(value).encode()


def option_refuses(parse, *args: Any) -> bool:
    """True if `parse(*args)` raises a click BadParameter or an AnyshapeError: what the command
    reports as a bad option."""
    try:
        parse(*args)
    except (typer.BadParameter, AnyshapeError):
        return True
    return False


def library_refuses(parse, *args: Any) -> bool:
    """True if `parse(*args)` raises an AnyshapeError; False if it accepts. Any other exception
    fails the test: a library parser refuses bad input only with an AnyshapeError."""
    try:
        parse(*args)
    except AnyshapeError as error:
        assert str(error).strip() and "Traceback" not in str(error)
        return True
    return False


# ---------------------------------------------------------------- the refusal contract


HANG_S = 30  # a refusal comes before any real work: far sooner than this


def _hung(signum, frame):
    raise TimeoutError(f"a bad input was not refused within {HANG_S} s")


@pytest.fixture
def refused(capsys):
    """refused(argv, out=None) runs the CLI in-process and checks the refusal: exit status 2, one
    line on stderr starting `anyshape: error:`, nothing on stdout, and `out` not created."""

    def run(argv: list[str], out: Path | None = None) -> str:
        tally.count("inputs fuzzed")
        capsys.readouterr()
        previous = signal.signal(signal.SIGALRM, _hung)
        signal.alarm(HANG_S)
        try:
            status = main([str(part) for part in argv])
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        captured = capsys.readouterr()
        assert status == 2, f"exit status {status} for {argv}: {captured.err[-2000:]}"
        assert captured.err.startswith("anyshape: error: "), captured.err
        assert captured.err.count("\n") == 1 and captured.err.endswith("\n"), captured.err
        assert len(captured.err) > len("anyshape: error: ") + 10, captured.err
        assert captured.out == "", captured.out
        if out is not None:
            assert not Path(out).exists(), f"{out} was left behind by a refused {argv}"
        return captured.err

    return run


@pytest.fixture
def tiny(tiny_dir) -> Path:
    return tiny_dir(TINY)


@pytest.fixture
def config(tiny):
    return load_config(tiny)


def fresh(tmp_path: Path, stem: str = "case") -> Path:
    """A path under tmp_path that no earlier example used."""
    return tmp_path / f"{stem}{next(_names)}"


# ---------------------------------------------------------------- Shapes

SHAPE_FIELDS = ("layers", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size")  # fmt: skip
SHAPE_EDGES = [
    "{", "[]", "{}x", '{"layers": []}', '{"layers": [3, 1]}', '{"layers": [0, 0]}', '{"hidden_size": 1e999}',
    '{"hidden_size": NaN}', '{"num_attention_heads": 3}', "x" * 300, "[" * 100_000, '{"a":' * 5000,
    '{"layers": "0,1"}', '{"num_hidden_layers": 2, "layers": [0]}', "\x00", "~/" + "y" * 4096,
]  # fmt: skip
shape_texts = st.one_of(
    field_dicts(SHAPE_FIELDS).map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=40).map(lambda text: "{" + text),
    st.text(max_size=40).map(lambda text: "[" + text),
    st.text(max_size=40),
    st.sampled_from(SHAPE_EDGES),
)  # fmt: skip


@FUZZ
@examples("text", SHAPE_EDGES)
@given(text=shape_texts)
def test_shape_inline_or_path(text, config, tiny, tmp_path, refused):
    assume(library_refuses(Shape.parse, text, config))
    out = fresh(tmp_path)
    refused(["extract", tiny, "--shape", text, "--out", out], out)


@FEW
@given(content=st.binary(max_size=200) | shape_texts.map(str.encode))
def test_shape_file(content, config, tiny, tmp_path, refused):
    path = fresh(tmp_path).with_suffix(".json")
    path.write_bytes(content)
    assume(library_refuses(Shape.parse, str(path), config))
    refused(["info", tiny, "--shape", path])


# ---------------------------------------------------------------- training settings and config files

SETTING_FIELDS = tuple(f for f in TrainSettings.__dataclass_fields__ if f not in ("out", "model"))


def bad_settings(record: dict[str, Any], tiny: Path, out: Path) -> bool:
    """True if the settings `record` (with the tiny model and `out`) are refused before training."""
    record = {"model": str(tiny), "out": str(out), **record}
    return library_refuses(lambda: TrainSettings.from_dict(record, "x").check())


@FUZZ
@given(record=field_dicts(SETTING_FIELDS))
def test_train_config_mapping(record, tiny, tmp_path, refused):
    out = fresh(tmp_path)
    assume(bad_settings(record, tiny, out))
    path = fresh(tmp_path).with_suffix(".yaml")
    path.write_text(yaml.safe_dump({"model": str(tiny), "out": str(out), **record}))
    refused(["train", "--config", path], out)


CONFIG_EDGES = [
    "- 1\n- 2", "steps: [", "steps: !!python/object:os.system x", "1: 2", "? [a, b]\n: 1", "&a [*a]", "steps: 1e999",
    "steps: .nan", "lr: .inf", "lr: -1", "seed: 100000000000000000000000", "a: b: c", "\t", "{", "null",
    "--- !!binary AAAA", "fractions: [0, 2]", "shapes: 5", "anchors: abc", "steps: true", "[" * 10**4,
]  # fmt: skip


@FEW
@given(text=st.text(max_size=60) | st.sampled_from(CONFIG_EDGES))
@examples("text", CONFIG_EDGES)
def test_train_config_text(text, tiny, tmp_path, refused):
    path = fresh(tmp_path).with_suffix(".yaml")
    path.write_text(text)
    try:
        record = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        record = None
    out = fresh(tmp_path)
    assume(not isinstance(record, dict) or bad_settings(record, tiny, out))
    refused(["train", tiny, "--config", path, "--out", out], out)


# ---------------------------------------------------------------- command-line options

CHOICE_OPTIONS = ("--sampling", "--kd", "--adapter", "--precision", "--distributed", "--budget-basis")
NUMBER_OPTIONS = {  # option: the settings field it sets
    "--steps": "steps", "--seq-len": "seq_len", "--batch-size": "batch_size", "--grad-accum": "grad_accum",
    "--val-fraction": "val_fraction", "--min-lr-ratio": "min_lr_ratio", "--tau-start": "tau_start",
    "--lora-rank": "lora_rank", "--experts": "experts", "--weight-decay": "weight_decay", "--align": "align",
    "--random-shapes": "random_shapes", "--save-every": "save_every", "--max-grad-norm": "max_grad_norm",
}  # fmt: skip


@FUZZ
@given(option=st.sampled_from(CHOICE_OPTIONS), value=st.text(max_size=12))
def test_train_choices(option, value, tiny, tmp_path, refused):
    field = option[2:].replace("-", "_")
    out = fresh(tmp_path)
    assume(bad_settings({field: value}, tiny, out))
    refused(["train", tiny, option, value, "--out", out], out)


@FUZZ
@given(option=st.sampled_from(sorted(NUMBER_OPTIONS)), value=numbers_as_text)
def test_train_numbers(option, value, tiny, tmp_path, refused):
    field, out = NUMBER_OPTIONS[option], fresh(tmp_path)
    parsed = _as_cli_reads(type(getattr(TrainSettings(), field)), value)
    assume(parsed is None or bad_settings({field: parsed}, tiny, out))
    refused(["train", tiny, option, value, "--out", out], out)


def _as_cli_reads(kind: type, text: str) -> int | float | None:
    """`text` as the CLI parses an option of type `kind`, or None if it refuses it; an integer
    option also takes an integral decimal ("3.0" is 3), as typer's validation does."""
    try:
        return kind(text)
    except (ValueError, OverflowError):
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return int(number) if kind is int and number.is_integer() else None


@FUZZ
@given(option=st.sampled_from(["--fractions", "--anchors", "--shapes"]), value=numbers_as_text | shape_texts)
def test_train_lists(option, value, tiny, tmp_path, refused):
    out = fresh(tmp_path)
    if option == "--fractions":
        assume(library_refuses(parse_fractions, value))
    elif option == "--anchors":
        assume(library_refuses(parse_anchors, value))
    else:
        assume(not value.lstrip().startswith(("{", "[")) or _bad_json_list(value))
    extra = ["--router"] if option == "--anchors" else ["--sampling", "fixed"] if option == "--shapes" else []
    refused(["train", tiny, option, value, *extra, "--out", out], out)


def _bad_json_list(text: str) -> bool:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return True
    return not all(isinstance(shape, dict) for shape in (value if isinstance(value, list) else [value]))


@FUZZ
@given(
    objectives=st.text(max_size=20) | st.sampled_from(["params", "ppl", "params,ppl,kd", "ppl,ppl", ",", "params,"]),
    algorithm=st.text(max_size=8),
)
def test_search_objectives_and_algorithm(objectives, algorithm, tiny, tmp_path, refused):
    from anyshape.cli.search import parse_objectives
    from anyshape.search.algorithms import ALGORITHMS

    assume(option_refuses(parse_objectives, objectives) or algorithm not in ALGORITHMS)
    out = fresh(tmp_path).with_suffix(".json")
    refused(["search", tiny, "--objectives", objectives, "--algorithm", algorithm, "--out", out], out)


@FUZZ
@given(option=st.sampled_from(["--max-params", "--min-params", "--fractions"]), value=numbers_as_text)
def test_search_bounds(option, value, config, tiny, tmp_path, refused):
    from anyshape.cli.search import parse_count

    if option == "--max-params":  # refused if unreadable or below the smallest Shape of the grid
        smallest = SearchSpace.from_fractions(config, parse_fractions("0.25,0.375,0.5,0.625,0.75,0.875,1"))
        limit = smallest.smallest().num_parameters(config)
        assume(option_refuses(parse_count, value, config, option) or parse_count(value, config, option) < limit)
    elif option == "--min-params":
        assume(option_refuses(parse_count, value, config, option))
    else:
        assume(library_refuses(parse_fractions, value))
    out = fresh(tmp_path).with_suffix(".json")
    refused(["search", tiny, option, value, "--out", out], out)


MINIMUMS = {"--trials": 1, "--num-sequences": 1, "--align": 1, "--sequence-length": 2, "--max-latency-ms": 0}


@FUZZ
@given(
    option=st.sampled_from(sorted(MINIMUMS)),
    value=st.integers(-(10**30), 0).map(str) | st.text(alphabet="abc,;-_ e", max_size=6),
)
@example(option="--seed", value=str(2**64))
@example(option="--seed", value=str(-(2**63) - 1))
def test_search_minimums(option, value, tiny, tmp_path, refused):
    """Numbers below an option's minimum, and text that is no number."""
    assume(option == "--seed" or not value.lstrip("-").isdigit() or int(value) < MINIMUMS[option])
    out = fresh(tmp_path).with_suffix(".json")
    refused(["search", tiny, option, value, "--out", out], out)


@FUZZ
@examples("target", SHAPE_EDGES)
@given(target=st.one_of(field_dicts(("num_hidden_layers", *SHAPE_FIELDS[2:])).map(json.dumps), shape_texts))
def test_prune_target(target, config, tiny, tmp_path, refused):
    assume(library_refuses(PruningTarget.parse, target, config))
    out = fresh(tmp_path)
    refused(["prune", tiny, "--target", target, "--out", out], out)


SCHEME_EDGES = [",", " , ", "", "activation:mean", "magnitude:mean:mean", "activation:mean:mean:mean"]
scheme_texts = st.one_of(
    st.text(max_size=20),
    st.lists(st.sampled_from(["activation", "magnitude", "taylor", "mean", "norm", "variance", "x", ""]),
             min_size=1, max_size=4).map(":".join),
    st.sampled_from(SCHEME_EDGES),
)  # fmt: skip


@FEW
@examples("schemes", SCHEME_EDGES)
@given(schemes=scheme_texts)
def test_rpd_schemes(schemes, tiny, refused):
    parts = [part for part in schemes.split(",") if part.strip()]
    assume(not parts or any(library_refuses(Scheme.parse, part) for part in parts))
    refused(["rpd", tiny, "--schemes", schemes, "--samples", "1"])


pair_texts = st.one_of(
    st.lists(st.tuples(st.integers(-3, 6), st.integers(-3, 6)).map(lambda p: f"{p[0]}:{p[1]}"), max_size=4).map(
        ",".join
    ),
    st.text(max_size=16),
    st.sampled_from(["1:0,1:0", "2:1,1:0", "0:1", "1:1", "3:2:1", "1:0,", "99999999999999999999:0", "1 : 0"]),
)


@FUZZ
@given(
    replace=st.sampled_from(["explicit", "next-interval", "consecutive"]) | st.text(max_size=8),
    pairs=pair_texts,
    start=st.none() | st.integers(-3, 8),
    count=st.none() | st.integers(-3, 8),
    group=st.integers(-2, 6),
    components=st.sampled_from(["mlp", "attention", "both"]) | st.text(max_size=6),
    recovery=st.sampled_from(["lowrank", "scaled"]) | st.text(max_size=6),
    rank=st.integers(-2, 3),
)
def test_share_plan(replace, pairs, start, count, group, components, recovery, rank, tiny, tmp_path, refused):
    assume(library_refuses(build_plan, replace, 4, start, count, group, pairs, components, recovery, max(rank, 0)))
    out = fresh(tmp_path)
    argv = ["share", tiny, "--out", out, "--replace", replace, "--pairs", pairs, "--group", group]
    argv += ["--components", components, "--recovery", recovery, "--rank", rank]
    argv += [] if start is None else ["--start-layer", start]
    argv += [] if count is None else ["--count", count]
    refused(argv, out)


BUDGET_EDGES = ["0", "1.5", "1e999K", "5B", "0K", "-1", "1e-400", ".", "1..0", "nan", "inf", "1" + "0" * 400]


@FUZZ
@examples("budget", BUDGET_EDGES)
@given(budget=numbers_as_text | st.sampled_from(BUDGET_EDGES))
def test_budget(budget, config):
    tally.count("inputs fuzzed")
    if library_refuses(Budget.parse, budget, config):
        return
    parsed = Budget.parse(budget, config)
    assert 0 < parsed.fraction <= 1 and math.isfinite(parsed.fraction)


# ---------------------------------------------------------------- scores files

UNITS = ("neurons", "heads", "kv_groups", "channels", "layers")
FITTING = {"neurons": (4, 96), "heads": (4, 4, 1), "kv_groups": (4, 4), "channels": (64,), "layers": (4,)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8, torch.float8_e4m3fn)


@st.composite
def scores_tensors(draw) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors named like a scores file's, mostly fitting the tiny model, with one thing wrong."""
    tensors = {}
    for unit in UNITS:
        if draw(st.integers(0, 9)) == 0:
            continue  # a missing unit
        size = FITTING[unit] if draw(st.booleans()) else tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        values = torch.full(size, draw(st.sampled_from([0.5, math.nan, math.inf, -1.0])))
        tensors[unit] = values.to(draw(st.sampled_from(DTYPES)))
    metadata = draw(st.sampled_from([{}, {"anyshape": "[1]"}, {"anyshape": "{"}, {"anyshape": '"x"'}, {"x": "y"}]))
    return tensors, metadata


SCORES_EDGES = [  # tensors that fit, with a header that is not a JSON object or is nested too deeply
    ({unit: torch.zeros(size) for unit, size in FITTING.items()}, {"anyshape": "[1]"}),
    ({unit: torch.zeros(1) for unit in UNITS}, {"anyshape": "[1]"}),
    ({unit: torch.zeros(size) for unit, size in FITTING.items()}, {"anyshape": "[" * 10**5}),
]


@FUZZ
@examples("case", SCORES_EDGES)
@given(case=scores_tensors() | st.binary(max_size=120))
def test_scores_file(case, config, tiny, tmp_path, refused):
    path = fresh(tmp_path).with_suffix(".safetensors")
    if isinstance(case, bytes):
        path.write_bytes(case)
    else:
        tensors, metadata = case
        if tensors:
            save_file(tensors, path, metadata=metadata)
        else:
            path.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    assume(library_refuses(Scores.load, path, config))
    out = fresh(tmp_path)
    refused(["sort", tiny, "--scores", path, "--out", out], out)


# ---------------------------------------------------------------- run folders

SELF = "<the run itself>"
parents = st.sampled_from(["missing-model", SELF, "", "smollm2-135m/x", "x" * 300]) | int_fields | json_values
run_records = st.one_of(
    st.binary(max_size=80),
    json_values.filter(lambda value: not isinstance(value, dict)).map(json.dumps),
    field_dicts(("settings",)).filter(lambda record: not isinstance(record.get("settings"), dict)).map(json.dumps),
    st.builds(lambda model, rest: json.dumps({"settings": {**rest, "model": model}}), parents, field_dicts(("steps",))),
)


@FUZZ
@given(record=run_records, metrics=st.binary(max_size=40), as_model=st.booleans())
def test_run_folder(record, metrics, as_model, tmp_path, refused):
    """A damaged train.json (its parent model missing, unreadable, or the run itself) and
    garbage metrics, in a run folder given as MODEL or to --resume."""
    run = fresh(tmp_path, "run")
    run.mkdir()
    record = record.replace(json.dumps(SELF), json.dumps(str(run))) if isinstance(record, str) else record
    (run / "train.json").write_bytes(record.encode() if isinstance(record, str) else record)
    (run / "metrics.jsonl").write_bytes(metrics)
    library_refuses(read_settings, run)  # refuses, or accepts settings whose model is missing
    refused(["info", run] if as_model else ["train", "--resume", run])
    assert sorted(path.name for path in run.iterdir()) == ["metrics.jsonl", "train.json"]


# ---------------------------------------------------------------- domains and reference losses

DOMAIN_EDGES = ["a=x.txt", "a=,b=y", "=x", "a=b=c", "a=1.jsonl,a=1.jsonl", ",", "a=" + "z" * 300 + ".txt"]
domain_texts = st.one_of(
    st.text(max_size=30),
    st.lists(st.tuples(st.text(max_size=5), st.sampled_from(["=", ""]), st.text(max_size=8)), max_size=3).map(
        lambda entries: ",".join("".join(entry) for entry in entries)
    ),
    st.sampled_from(DOMAIN_EDGES),
)


@FUZZ
@examples("domains", DOMAIN_EDGES)
@given(domains=domain_texts)
def test_domains(domains, tiny, tmp_path, refused):
    assume(library_refuses(parse_domains, domains))
    out = fresh(tmp_path)
    refused(["train", tiny, "--domains", domains, "--out", out], out)


LOSS_EDGES = [b'{"a": 1e999, "b": 1}', b'{"a": NaN, "b": 1}', b'{"a": 1' + b"0" * 400 + b', "b": 1}', b"[" * 10**5]


@FEW
@given(
    content=st.one_of(
        st.binary(max_size=60),
        json_values.map(_encoded),
        st.dictionaries(st.sampled_from(["a", "b", "c"]), json_values, max_size=3).map(_encoded),
        st.sampled_from(LOSS_EDGES),
    )
)
@examples("content", LOSS_EDGES)
def test_reference_losses(content, tiny, tmp_path, monkeypatch, refused):
    monkeypatch.setenv("ANYSHAPE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "domain.txt"
    data.write_text("some text to train on. " * 40)
    path = fresh(tmp_path).with_suffix(".json")
    path.write_bytes(content)
    assume(library_refuses(read_reference_losses, path, ["a", "b"]))
    out = fresh(tmp_path)
    domains = f"a={data},b={data}"
    argv = ["train", tiny, "--domains", domains, "--dynamic-batch", "--reference-losses", path]
    refused([*argv, "--seq-len", "16", "--steps", "1", "--out", out], out)
