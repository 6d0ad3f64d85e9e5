"""The optional dependencies (pip extras, see pyproject.toml): each is imported only by what needs
it, through `require`, so a missing one costs only that feature, named with the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from anyshape.errors import AnyshapeError

EXTRAS = {  # module -> (the extra that installs it, its package)
    "lm_eval": ("eval", "lm-eval"),
    "gguf": ("gguf", "gguf"),
    "llama_cpp": ("llamacpp", "llama-cpp-python"),
    "optuna": ("search", "optuna"),
    "matplotlib": ("plots", "matplotlib"),
    "fastapi": ("serve", "fastapi"),
    "uvicorn": ("serve", "uvicorn"),
    "prometheus_client": ("serve", "prometheus-client"),
}


def install_hint(module: str) -> str:
    """How to install `module`: "pip install 'anyshape[eval]'"."""
    return f"pip install 'anyshape[{EXTRAS[module][0]}]'"


def require(module: str, what: str) -> ModuleType:
    """`module` (a key of EXTRAS) imported; if it, or a module it needs, is not installed, an
    AnyshapeError in one line: "`what` needs lm-eval: pip install 'anyshape[eval]'"."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        package = EXTRAS[module][1]
        missing = error.name.split(".")[0] if error.name else module
        detail = "" if missing == module else f" (no module named {missing!r})"
        raise AnyshapeError(f"{what} needs {package}{detail}: {install_hint(module)}") from None
