"""The size a pruning run must reach: a Shape-like dict of the five HF sizes, or the config.json
of an existing smaller model of the same family (Sheared LLaMA prunes to such a config)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from anyshape.checkpoints import load_config
from anyshape.errors import AnyshapeError
from anyshape.model.config import LlamaFamilyConfig
from anyshape.shape import WIDTH_FIELDS, Shape

FIELDS = ("num_hidden_layers", *WIDTH_FIELDS)


@dataclass(frozen=True)
class PruningTarget:
    """The target's sizes (HF names): L' layers, H' channels, Q' query heads, G' KV heads, F' neurons,
    the same in every kept layer."""

    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def fractions(self, parent: LlamaFamilyConfig) -> dict[str, float]:
        """Each size as a fraction of the parent's (the Lagrangian's normalised targets)."""
        return {name: getattr(self, name) / getattr(parent, name) for name in FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], parent: LlamaFamilyConfig) -> PruningTarget:
        """Validates sizes against `parent`; a missing size keeps the parent's. Raises AnyshapeError
        naming the field, the limit and the fix."""
        if not isinstance(data, dict):
            raise AnyshapeError(f"a pruning target must be a JSON object of sizes, got {type(data).__name__}")
        unknown = sorted(set(data) - set(FIELDS))
        if unknown:
            raise AnyshapeError(f"unknown pruning target field {unknown[0]!r}; allowed fields: {', '.join(FIELDS)}")
        sizes = {name: data.get(name, getattr(parent, name)) for name in FIELDS}
        for name, value in sizes.items():
            limit = getattr(parent, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AnyshapeError(f"pruning target {name}={value!r} must be a positive integer (at most {limit})")
            if value > limit:
                raise AnyshapeError(
                    f"pruning target {name}={value} is larger than the source model's {name}={limit}; "
                    f"pruning only removes units, so use at most {limit}"
                )
        layers = tuple(range(sizes.pop("num_hidden_layers")))
        shape = Shape(layers, **sizes).validate(parent)  # heads vs KV groups, as for any Shape
        return cls(len(layers), **{name: getattr(shape, name) for name in WIDTH_FIELDS})

    @classmethod
    def from_config(cls, path: str | Path, parent: LlamaFamilyConfig) -> PruningTarget:
        """The sizes of an existing model: its folder or its config.json. It must be of the parent's
        model_type, head_dim and vocabulary, since pruning keeps those."""
        path = Path(path)
        config = load_config(path.parent if path.name == "config.json" else path)
        for name in ("model_type", "head_dim", "vocab_size"):
            if getattr(config, name) != getattr(parent, name):
                raise AnyshapeError(
                    f"the target config {path} has {name}={getattr(config, name)!r} but the source model has "
                    f"{getattr(parent, name)!r}; pruning keeps {name}, so use a target of the source's family "
                    "or give the sizes as JSON"
                )
        return cls.from_dict({name: getattr(config, name) for name in FIELDS}, parent)

    @classmethod
    def parse(cls, text_or_path: str | Path, parent: LlamaFamilyConfig) -> PruningTarget:
        """Inline JSON of sizes (`{"hidden_size": 384, ...}`), or a model folder or config.json path."""
        text = str(text_or_path)
        if text.lstrip().startswith("{"):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as error:
                raise AnyshapeError(
                    f"pruning target is not valid JSON ({error.msg} at column {error.colno}); "
                    "quote field names, e.g. '{\"hidden_size\": 384}'"
                ) from None
            except RecursionError:
                raise AnyshapeError("pruning target is nested too deeply; write one JSON object of sizes") from None
            return cls.from_dict(data, parent)
        return cls.from_config(text, parent)
