"""anyshape: turn one pretrained Llama-family LLM into a family of smaller, standard LLMs."""

__version__ = "0.1.0"

from anyshape.errors import AnyshapeError, CheckpointError, DataError, ShapeError  # noqa: E402
from anyshape.export.hf import export_hf  # noqa: E402
from anyshape.model.llama import ElasticLlama, KVCache  # noqa: E402
from anyshape.model.load import load, load_config, load_tokenizer  # noqa: E402
from anyshape.runtime.generate import Sampling, generate  # noqa: E402
from anyshape.shape import Shape  # noqa: E402

__all__ = [
    "AnyshapeError",
    "CheckpointError",
    "DataError",
    "ElasticLlama",
    "KVCache",
    "Sampling",
    "Shape",
    "ShapeError",
    "__version__",
    "export_hf",
    "generate",
    "load",
    "load_config",
    "load_tokenizer",
]
