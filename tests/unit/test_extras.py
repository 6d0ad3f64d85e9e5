"""The optional dependencies: nothing heavy is imported to start the CLI, and a missing extra stops
the command that needs it with one line naming the extra to install (exit status 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from anyshape.deploy.speed import GGUF_TYPES
from anyshape.errors import AnyshapeError
from anyshape.extras import EXTRAS, require
from tests.unit.test_architecture import HEAVY
from tests.unit.test_cli import assert_bad_input

ROOT = Path(__file__).resolve().parents[2]


def heavy_modules_after(args: list[str]) -> list[str]:
    """The HEAVY modules imported by `anyshape ARGS` in a fresh interpreter."""
    script = (
        "import contextlib, io, json, sys\n"
        "from anyshape.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()):\n    status = main({args!r})\n"
        f"print(json.dumps([status, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    status, modules = json.loads(done.stdout.splitlines()[-1])
    assert status == 0
    return modules


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]], ids=["anyshape", "train"])
def test_help_imports_no_optional_dependency(args):
    assert heavy_modules_after(args) == []


def test_every_heavy_module_is_an_extra():
    assert set(EXTRAS) == set(HEAVY)


@pytest.mark.parametrize(
    ("module", "args", "words"),
    [
        ("lm_eval", ["evaluate", "MODEL", "--tasks", "hellaswag"], ["anyshape evaluate --tasks needs lm-eval"]),
        ("lm_eval", ["report", "FAMILY", "--tasks", "hellaswag"], ["anyshape report --tasks needs lm-eval"]),
        ("gguf", ["export", "MODEL", "--out", "OUT.gguf"], ["anyshape export --format gguf needs gguf"]),
        ("optuna", ["search", "MODEL"], ["anyshape search --algorithm nsga2 needs optuna"]),
        ("optuna", ["compress", "MODEL"], ["anyshape compress --algorithm nsga2 needs optuna"]),
        ("matplotlib", ["search", "MODEL", "--algorithm", "random"], ["anyshape search needs matplotlib"]),
        ("matplotlib", ["bench", "MODEL", "--plot", "OUT.png"], ["anyshape bench --plot needs matplotlib"]),
        ("matplotlib", ["report", "FAMILY"], ["anyshape report needs matplotlib"]),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(capsys, monkeypatch, tmp_path, module, args, words):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
    extra = EXTRAS[module][0]
    args = [str(tmp_path / arg) if arg.startswith(("OUT", "FAMILY")) else arg for arg in args]
    assert_bad_input(capsys, args, *words, f"pip install 'anyshape[{extra}]'")
    assert list(tmp_path.iterdir()) == []


def test_require_imports_or_names_the_extra(monkeypatch):
    assert require("optuna", "x").__name__ == "optuna"
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(AnyshapeError, match=r"^x needs optuna: pip install 'anyshape\[search\]'$"):
        require("optuna", "x")


def test_gguf_types_are_the_exporters():
    from anyshape.export.gguf import OUTTYPES

    assert GGUF_TYPES == tuple(OUTTYPES)
