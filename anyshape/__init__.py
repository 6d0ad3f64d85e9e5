"""anyshape: turn one pretrained Llama-family LLM into a family of smaller, standard LLMs."""

from anyshape.checkpoints import load, load_config, load_tokenizer
from anyshape.errors import AnyshapeError, CheckpointError, DataError, ShapeError
from anyshape.export.hf import export_hf
from anyshape.model.llama import ElasticLlama, KVCache
from anyshape.runtime.generate import Sampling, generate
from anyshape.shape import Shape
from anyshape.version import __version__

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
