"""ElasticLlama: one pure-PyTorch Llama-family model that runs any Shape by slicing weights.

Parameter names are the Hugging Face names, so checkpoints load and export by key identity.
`forward(input_ids, shape=...)` takes the Shape as an argument: nothing about a sub-network
is stored on the modules, and a smaller Shape does proportionally less work.

Notation: B batch, T tokens, H' hidden channels, Q'/G' query/key-value heads, d head_dim,
F' MLP neurons, V vocabulary (primes: the Shape's widths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.slicing import slice_parameter
from anyshape.shape import Shape


def sliced(module: nn.Module, config: LlamaFamilyConfig, shape: Shape) -> dict[str, Tensor]:
    """The Shape's slice of every parameter of `module`, keyed by its relative name."""
    return {name: slice_parameter(name, tensor, config, shape) for name, tensor in module.named_parameters()}


class Attention(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.config = config
        q_width = config.num_attention_heads * config.head_dim
        kv_width = config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_width, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_width, config.hidden_size, bias=config.o_bias)
        self.head_outputs = nn.Identity()  # tap for hooks: (B, T, Q' d) entering o_proj

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], shape: Shape) -> Tensor:
        """x: (B, T, H') -> (B, T, H'). rope: cos and sin, each (T, d)."""
        w = sliced(self, self.config, shape)
        B, T, _ = x.shape
        d = self.config.head_dim
        q = F.linear(x, w["q_proj.weight"], w.get("q_proj.bias")).view(B, T, -1, d).transpose(1, 2)
        k = F.linear(x, w["k_proj.weight"], w.get("k_proj.bias")).view(B, T, -1, d).transpose(1, 2)
        v = F.linear(x, w["v_proj.weight"], w.get("v_proj.bias")).view(B, T, -1, d).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, Q', T, d), (B, G', T, d)
        mask = self._window_mask(T, x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=q.shape[1] != k.shape[1]
        )  # (B, Q', T, d)
        y = self.head_outputs(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, Q' d)
        return F.linear(y, w["o_proj.weight"], w.get("o_proj.bias"))

    def _window_mask(self, T: int, device: torch.device) -> Tensor | None:
        """Causal sliding-window mask (T, T), True = attend; None when the window covers T."""
        window = self.config.sliding_window
        if window is None or T <= window:
            return None
        i = torch.arange(T, device=device)
        distance = i[:, None] - i[None, :]
        return (distance >= 0) & (distance < window)


class MLP(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.config = config
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)
        self.act = ACT2FN[config.hidden_act]
        self.neuron_outputs = nn.Identity()  # tap for hooks: (B, T, F') entering down_proj

    def forward(self, x: Tensor, shape: Shape) -> Tensor:
        """x: (B, T, H') -> (B, T, H'), through F' neurons."""
        w = sliced(self, self.config, shape)
        gate = F.linear(x, w["gate_proj.weight"], w.get("gate_proj.bias"))  # (B, T, F')
        up = F.linear(x, w["up_proj.weight"], w.get("up_proj.bias"))  # (B, T, F')
        neurons = self.neuron_outputs(self.act(gate) * up)  # (B, T, F')
        return F.linear(neurons, w["down_proj.weight"], w.get("down_proj.bias"))


class RMSNorm(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x: Tensor, shape: Shape) -> Tensor:
        """x: (B, T, H'), normalised over its own H' channels, as the exported model does."""
        weight = slice_parameter("norm.weight", self.weight, self.config, shape)
        return F.rms_norm(x, weight.shape, weight, self.config.rms_norm_eps)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], shape: Shape) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x, shape), rope, shape)
        x = x + self.mlp(self.post_attention_layernorm(x, shape), shape)
        return x


class Backbone(nn.Module):
    """Embeddings, layers and final norm; named `model` inside ElasticLlama, as in HF."""

    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config)


class ElasticLlama(nn.Module):
    """A Llama-family causal LM whose forward pass runs any Shape of itself."""

    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def full_shape(self) -> Shape:
        return Shape.full(self.config)

    def forward(self, input_ids: Tensor, shape: Shape | None = None) -> Tensor:
        """input_ids: (B, T) token ids -> logits (B, T, V) of the sub-network `shape`
        (None: the full model). The Shape must be valid for this model (`Shape.validate`)."""
        shape = shape or self.full_shape
        return self.lm_head_logits(self.hidden_states(input_ids, shape), shape)

    def hidden_states(self, input_ids: Tensor, shape: Shape) -> Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, H')."""
        embedding = slice_parameter("embed_tokens.weight", self.model.embed_tokens.weight, self.config, shape)
        x = F.embedding(input_ids, embedding)  # (B, T, H')
        rope = self.rope(input_ids.shape[1], x.dtype)
        for index in shape.layers:
            x = self.model.layers[index](x, rope, shape)
        return self.model.norm(x, shape)

    def lm_head_logits(self, hidden: Tensor, shape: Shape) -> Tensor:
        """hidden (B, T, H') -> logits (B, T, V)."""
        return F.linear(hidden, slice_parameter("lm_head.weight", self.lm_head.weight, self.config, shape))

    def rope(self, T: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of the rotary embedding at positions 0..T-1, each (T, d)."""
        positions = torch.arange(T, device=self.inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, self.inv_freq.float())  # (T, d/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, d)
        return (angles.cos() * self.rope_scaling).to(dtype), (angles.sin() * self.rope_scaling).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding on x (B, heads, T, d), in HF's rotate-half layout."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def rope_frequencies(config: LlamaFamilyConfig) -> tuple[Tensor, float]:
    """Inverse frequencies (d/2,) and output scale of the checkpoint's RoPE variant, computed by
    `transformers` itself so every variant (default, linear, llama3, yarn) matches it exactly.
    Always on CPU, also when the model is built on the meta device for loading."""
    hf = config.hf
    rope_parameters = (getattr(hf, "rope_parameters", None) or {}) if hf is not None else {}
    rope_type = rope_parameters.get("rope_type", "default")
    with torch.device("cpu"):
        if rope_type != "default":
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf)
            return inv_freq, float(scaling)
        theta, d = rope_parameters.get("rope_theta", 10000.0), config.head_dim
        return 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float) / d)), 1.0
