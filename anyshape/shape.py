"""The Shape: the whole description of a sub-network of a parent model.

A Shape keeps an ordered subset of the parent's layers and a prefix of its widths, shared by
all kept layers (a uniform shape, which every runtime loads):

    layers               kept layer indices, strictly increasing, in [0, L)
    hidden_size          H' <= H   embedding channels
    num_attention_heads  Q' <= Q   query heads, Q' = G' * q' with q' <= Q / G
    num_key_value_heads  G' <= G   key/value heads (GQA groups)
    intermediate_size    F' <= F   MLP neurons

Field names are the Hugging Face config names. `head_dim` is never elastic.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyshape.errors import ShapeError

if TYPE_CHECKING:  # the Shape is checked against a config, which lives in the model above it
    from anyshape.model.config import LlamaFamilyConfig

Size = Any  # an int, a float or a tensor of sizes
WIDTH_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size")


@dataclass(frozen=True)
class Shape:
    layers: tuple[int, ...]
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    @classmethod
    def full(cls, config: LlamaFamilyConfig) -> Shape:
        """The parent model itself."""
        return cls(
            layers=tuple(range(config.num_hidden_layers)),
            **{name: getattr(config, name) for name in WIDTH_FIELDS},
        )

    @property
    def queries_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layers)

    # ---------------------------------------------------------------- validation

    def validate(self, config: LlamaFamilyConfig) -> Shape:
        """Returns self if it is a sub-network of `config`; raises ShapeError naming the field."""
        if not self.layers:
            raise ShapeError('layers is empty; keep at least one layer, e.g. "layers": [0]')
        n = config.num_hidden_layers
        for index in self.layers:
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
                raise ShapeError(
                    f"layers: index {index!r} is out of range; the parent has {n} layers, "
                    f"so indices must be integers in 0..{n - 1}"
                )
        if any(a >= b for a, b in zip(self.layers[:-1], self.layers[1:], strict=True)):
            raise ShapeError(
                f"layers {list(self.layers)} must be strictly increasing (each kept layer once, in the parent's order)"
            )
        for name in WIDTH_FIELDS:
            value, limit = getattr(self, name), getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise ShapeError(
                    f"{name}={value!r} is out of range; the parent has {name}={limit}, "
                    f"so it must be an integer in 1..{limit}"
                )
        if self.num_attention_heads % self.num_key_value_heads:
            per_group = max(1, min(self.queries_per_group, config.queries_per_group))
            raise ShapeError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; query heads are kept per KV "
                f"group, so use a multiple such as {self.num_key_value_heads * per_group}"
            )
        if self.queries_per_group > config.queries_per_group:
            raise ShapeError(
                f"num_attention_heads={self.num_attention_heads} with num_key_value_heads="
                f"{self.num_key_value_heads} puts {self.queries_per_group} query heads in each KV "
                f"group, but the parent has {config.queries_per_group} per group; use at most "
                f"{self.num_key_value_heads * config.queries_per_group} heads or more KV heads"
            )
        return self

    # ---------------------------------------------------------------- arithmetic

    def num_parameters(self, config: LlamaFamilyConfig, embeddings: bool = True) -> int:
        """Parameters of the exported model of this Shape (`embeddings=False`: without the
        input embedding and LM head matrices)."""
        return parameter_count(
            config, len(self.layers), self.hidden_size, self.num_key_value_heads, self.queries_per_group,
            self.intermediate_size, embeddings,
        )  # fmt: skip

    def flops_per_token(self, config: LlamaFamilyConfig, context: int = 512) -> int:
        """Forward FLOPs for one token (multiply-add = 2 FLOPs), attending to `context` earlier
        tokens: every matrix product including the LM head, plus attention scores and values."""
        matmul_params = self.num_parameters(config, embeddings=False) + config.vocab_size * self.hidden_size
        attention = 2 * 2 * len(self.layers) * self.num_attention_heads * config.head_dim * context
        return 2 * matmul_params + attention

    # ---------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any], config: LlamaFamilyConfig) -> Shape:
        """Builds and validates a Shape; missing widths default to the parent's.

        `layers` may be replaced by `num_hidden_layers: n`, meaning the first n layers.
        """
        if not isinstance(data, dict):
            raise ShapeError(f"a shape must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} | {"num_hidden_layers"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ShapeError(f"unknown shape field {unknown[0]!r}; allowed fields: {', '.join(sorted(known))}")
        values = {name: data.get(name, getattr(config, name)) for name in WIDTH_FIELDS}
        layers = data.get("layers")
        depth = data.get("num_hidden_layers")
        if layers is None:
            if depth is None:
                depth = config.num_hidden_layers
            if not isinstance(depth, int) or isinstance(depth, bool) or not 1 <= depth <= config.num_hidden_layers:
                raise ShapeError(
                    f"num_hidden_layers={depth!r} is out of range; it must be an integer in "
                    f"1..{config.num_hidden_layers}"
                )
            layers = list(range(depth))
        elif not isinstance(layers, list):
            raise ShapeError(f"layers must be a list of layer indices, got {layers!r}")
        elif depth is not None and depth != len(layers):
            raise ShapeError(
                f"num_hidden_layers={depth} disagrees with the {len(layers)} entries of layers; give one of the two"
            )
        return cls(layers=tuple(layers), **values).validate(config)

    @classmethod
    def parse(cls, text_or_path: str | Path, config: LlamaFamilyConfig) -> Shape:
        """Reads a Shape from inline JSON or from a JSON file's path."""
        text = str(text_or_path)
        if not text.lstrip().startswith(("{", "[")):
            path = Path(text)
            try:
                is_file = path.is_file()
            except OSError:  # e.g. a name longer than the file system allows
                is_file = False
            if not is_file:
                raise ShapeError(f"shape {text!r} is neither inline JSON (starting with '{{') nor a JSON file")
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                raise ShapeError(f"shape file {text!r} is not UTF-8 JSON text") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ShapeError(
                f"shape is not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
                "quote field names, e.g. '{\"hidden_size\": 448}'"
            ) from None
        except RecursionError:
            raise ShapeError("shape is nested too deeply; write one JSON object of sizes") from None
        return cls.from_dict(data, config)


def parameter_count(
    config: LlamaFamilyConfig,
    depth: Size,
    hidden: Size,
    groups: Size,
    per_group: Size,
    ffn: Size,
    embeddings: bool = True,
) -> Size:
    """Parameters of a uniform sub-network of `config` with these sizes (kept layers, H', G',
    q' query heads per group, F'). Multilinear in the sizes, so with tensors of expected sizes
    under independent choices it is the expected count, and it broadcasts over grids."""
    q_width = groups * per_group * config.head_dim
    kv_width = groups * config.head_dim
    attention = hidden * (q_width + 2 * kv_width) + q_width * hidden
    attention = attention + config.qkv_bias * (q_width + 2 * kv_width) + config.o_bias * hidden
    mlp = 3 * hidden * ffn + config.mlp_bias * (2 * ffn + hidden)
    norms = 2 * hidden
    total = depth * (attention + mlp + norms) + hidden  # + final norm
    if embeddings:
        total = total + config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    return total
