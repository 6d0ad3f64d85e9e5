"""The architecture of a Llama-family model (Llama, Mistral, Qwen2; SmolLM is Llama).

`LlamaFamilyConfig` is a typed, validated view of a `transformers` config: field names are
the Hugging Face names, and the original config is kept in `hf` so export can write it back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PretrainedConfig

from anyshape.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class LlamaFamilyConfig:
    """Geometry and variants of a decoder-only Llama-family transformer.

    Biases: `qkv_bias` (Qwen2; Llama's `attention_bias`), `o_bias` (Llama's `attention_bias`
    only), `mlp_bias` (Llama's `mlp_bias`). `sliding_window` is the attention span in tokens
    (Mistral), or None for full causal attention.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    hf: PretrainedConfig | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"model_type {self.model_type!r} is not supported; anyshape reads "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; the checkpoint's config is invalid"
            )

    @property
    def queries_per_group(self) -> int:
        """Query heads that share one key/value head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: PretrainedConfig) -> LlamaFamilyConfig:
        """Reads a `LlamaConfig`, `MistralConfig` or `Qwen2Config`; raises CheckpointError otherwise."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"model_type {model_type!r} is not supported; anyshape reads "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints"
            )
        rope_type = (getattr(hf, "rope_parameters", None) or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CheckpointError(
                f"rope_type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if model_type == "qwen2" and getattr(hf, "use_sliding_window", False):
            raise CheckpointError(
                "Qwen2 with use_sliding_window=true is not supported; set it to false in config.json "
                "if the model was trained with full attention"
            )
        heads = hf.num_attention_heads
        attention_bias = bool(getattr(hf, "attention_bias", False))
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            hidden_act=hf.hidden_act,
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type == "llama" and attention_bias,
            mlp_bias=model_type == "llama" and bool(getattr(hf, "mlp_bias", False)),
            sliding_window=getattr(hf, "sliding_window", None) if model_type == "mistral" else None,
            hf=hf,
        )
