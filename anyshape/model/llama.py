"""ElasticLlama: one pure-PyTorch Llama-family model that runs any Shape by slicing weights.

Parameter names are the Hugging Face names, so checkpoints load and export by key identity.
`forward(input_ids, shape=...)` takes the Shape as an argument: nothing about a sub-network
is stored on the modules, and a smaller Shape does proportionally less work. For incremental
decoding, `forward(input_ids, shape, cache=KVCache(shape))` remembers the keys and values of
the tokens seen so far, so each call only runs the new tokens; given one KVCache per row,
rows of different lengths decode in one batch (a server's continuous batching).

Notation: B batch, T tokens, H' hidden channels, Q'/G' query/key-value heads, d head_dim,
F' MLP neurons, V vocabulary (primes: the Shape's widths).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from anyshape.errors import AnyshapeError
from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.head import HiddenLoss
from anyshape.model.masks import LayerGates, MaskedShape
from anyshape.model.slicing import slice_parameter
from anyshape.shape import Shape


@dataclass
class LayerKV:
    """The keys (RoPE applied) and values one attention layer has computed so far."""

    keys: Tensor | None = None  # (B, G', T_past, d)
    values: Tensor | None = None  # (B, G', T_past, d)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Adds the new tokens' k and v, each (B, G', T, d); returns all keys and values so
        far, each (B, G', T_past + T, d)."""
        self.keys = k if self.keys is None else torch.cat((self.keys, k), dim=2)
        self.values = v if self.values is None else torch.cat((self.values, v), dim=2)
        return self.keys, self.values


@dataclass
class KVCache:
    """What incremental decoding keeps of the tokens seen so far, for one Shape and one batch.

    `layers[i]` belongs to the Shape's i-th kept layer; `length` tokens have been run, so the
    next token's position is `length`. Every call that uses the cache must pass the same Shape.
    """

    shape: Shape
    length: int = 0
    layers: list[LayerKV] = field(init=False)

    def __post_init__(self) -> None:
        self.layers = [LayerKV() for _ in self.shape.layers]

    def crop(self, length: int) -> None:
        """Forgets every token from position `length` on (e.g. to reuse a shared prefix)."""
        if not 0 <= length <= self.length:
            raise AnyshapeError(f"cannot crop a cache of {self.length} tokens to {length}; use 0..{self.length}")
        for layer in self.layers:
            if layer.keys is not None:
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
        self.length = length


class ElasticLinear(nn.Linear):
    """A projection that runs the Shape's slice of itself: x (B, T, in') -> (B, T, out').

    `name` is its Hugging Face suffix (q_proj, ..., down_proj), which picks its slicing rule.
    Two slots are None unless training fills them: `adapter` (`anyshape.model.adapters`), a
    module `adapter(x, shape)` whose output, (B, T, out'), is added (a low-rank update on the
    same slices); and `modulation` (`anyshape.model.modulation`), a module `modulation(shape)`
    whose output, (out',), scales the output channels.
    """

    def __init__(self, name: str, in_features: int, out_features: int, bias: bool, config: LlamaFamilyConfig):
        super().__init__(in_features, out_features, bias=bias)
        self.name, self.config = name, config
        self.register_module("adapter", None)
        self.register_module("modulation", None)

    def forward(self, x: Tensor, shape: Shape) -> Tensor:
        weight = slice_parameter(f"{self.name}.weight", self.weight, self.config, shape)
        bias = None if self.bias is None else slice_parameter(f"{self.name}.bias", self.bias, self.config, shape)
        y = F.linear(x, weight, bias)
        if self.adapter is not None:
            y = y + self.adapter(x, shape)
        return y if self.modulation is None else y * self.modulation(shape)


class Attention(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.config = config
        q_width = config.num_attention_heads * config.head_dim
        kv_width = config.num_key_value_heads * config.head_dim
        self.q_proj = ElasticLinear("q_proj", config.hidden_size, q_width, config.qkv_bias, config)
        self.k_proj = ElasticLinear("k_proj", config.hidden_size, kv_width, config.qkv_bias, config)
        self.v_proj = ElasticLinear("v_proj", config.hidden_size, kv_width, config.qkv_bias, config)
        self.o_proj = ElasticLinear("o_proj", q_width, config.hidden_size, config.o_bias, config)
        self.head_outputs = nn.Identity()  # tap for hooks: (B, T, Q' d) entering o_proj

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        shape: Shape,
        past: LayerKV | Sequence[LayerKV] | None = None,
        head_mask: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, H') -> (B, T, H'). rope: cos and sin at the T tokens' positions, each (T, d),
        or (B, 1, T, d) where the rows' positions differ. `past`: this layer's keys and values
        of the earlier tokens, extended in place with the T new ones (which then come last:
        positions T_past..T_past + T - 1); or B of them, one per row, each of batch 1 and of its
        own length. `head_mask` (Q' d,): multiplies the heads' outputs entering o_proj (a
        MaskedShape's `LayerGates.heads`)."""
        B, T, _ = x.shape
        d = self.config.head_dim
        q = self.q_proj(x, shape).view(B, T, -1, d).transpose(1, 2)
        k = self.k_proj(x, shape).view(B, T, -1, d).transpose(1, 2)
        v = self.v_proj(x, shape).view(B, T, -1, d).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, Q', T, d), (B, G', T, d)
        if past is None or isinstance(past, LayerKV):
            y = self._attend(q, *(past.append(k, v) if past is not None else (k, v)))  # (B, Q', T, d)
        else:  # each row attends to its own cache
            rows = zip(q.split(1), k.split(1), v.split(1), past, strict=True)
            y = torch.cat([self._attend(q_b, *kv.append(k_b, v_b)) for q_b, k_b, v_b, kv in rows])
        y = self.head_outputs(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, Q' d)
        if head_mask is not None:
            y = y * head_mask
        return self.o_proj(y, shape)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Scaled dot-product attention of the T newest queries q (B, Q', T, d) over the S keys
        and values k, v (B, G', S, d), the queries last among them -> (B, Q', T, d)."""
        T, S = q.shape[2], k.shape[2]
        mask = self._mask(T, S, q.device)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=q.shape[1] != k.shape[1]
        )

    def _mask(self, T: int, S: int, device: torch.device) -> Tensor | None:
        """Which of the S keys each of the T newest queries sees: (T, S), True = attend; causal,
        and within the sliding window if the model has one. None where SDPA needs no mask: no
        window cuts into the S keys, and T = S (`is_causal`) or T = 1 (every key)."""
        window = self.config.sliding_window
        if (window is None or S <= window) and T in (1, S):
            return None
        distance = torch.arange(S - T, S, device=device)[:, None] - torch.arange(S, device=device)[None, :]
        allowed = distance >= 0
        return allowed if window is None else allowed & (distance < window)


class MLP(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.config = config
        bias = config.mlp_bias
        self.gate_proj = ElasticLinear("gate_proj", config.hidden_size, config.intermediate_size, bias, config)
        self.up_proj = ElasticLinear("up_proj", config.hidden_size, config.intermediate_size, bias, config)
        self.down_proj = ElasticLinear("down_proj", config.intermediate_size, config.hidden_size, bias, config)
        self.act = ACT2FN[config.hidden_act]
        self.neuron_outputs = nn.Identity()  # tap for hooks: (B, T, F') entering down_proj

    def forward(self, x: Tensor, shape: Shape, neuron_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, H') -> (B, T, H'), through F' neurons. `neuron_mask` (F',): multiplies the
        neurons entering down_proj (a MaskedShape's `LayerGates.neurons`)."""
        neurons = self.neuron_outputs(self.act(self.gate_proj(x, shape)) * self.up_proj(x, shape))  # (B, T, F')
        if neuron_mask is not None:
            neurons = neurons * neuron_mask
        return self.down_proj(neurons, shape)


class RMSNorm(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.ones(config.hidden_size))

    def forward(self, x: Tensor, shape: Shape, hidden_mask: Tensor | None = None) -> Tensor:
        """x: (B, T, H'), normalised over its own H' channels, as the exported model does.

        With `hidden_mask` (H,), a MaskedShape's, x is zero outside the kept channels and is
        normalised over those only: mean square sum(x^2) / hidden_mask.sum(). The output is zero
        outside them as x is, so it is not masked again: a second mask factor would leave a
        dropped channel's gradient zero, m * m having no slope at m = 0. The count of kept
        channels is a constant of the backward pass: its slope alone, without the slope of
        sum(x^2), which is zero at a dropped channel, would say that every channel added shrinks
        the RMS."""
        weight = slice_parameter("norm.weight", self.weight, self.config, shape)
        if hidden_mask is None:
            return F.rms_norm(x, weight.shape, weight, self.config.rms_norm_eps)
        mean_square = x.pow(2).sum(-1, keepdim=True) / hidden_mask.detach().sum()  # (B, T, 1)
        return x * torch.rsqrt(mean_square + self.config.rms_norm_eps) * weight


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaFamilyConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        shape: Shape,
        past: LayerKV | Sequence[LayerKV] | None = None,
        gates: LayerGates | None = None,
    ) -> Tensor:
        """x: (B, T, H') -> (B, T, H'); rope and past as Attention takes them. With `gates` (a
        MaskedShape's, H' = H) the norms average over the kept channels, heads and neurons are
        masked, and each branch's output is multiplied by `gates.residual` before it is added."""
        if gates is None:
            x = x + self.self_attn(self.input_layernorm(x, shape), rope, shape, past)
            x = x + self.mlp(self.post_attention_layernorm(x, shape), shape)
            return x
        attended = self.self_attn(self.input_layernorm(x, shape, gates.hidden), rope, shape, past, gates.heads)
        x = x + gates.residual * attended
        transformed = self.mlp(self.post_attention_layernorm(x, shape, gates.hidden), shape, gates.neurons)
        return x + gates.residual * transformed


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
        self.checkpoint_layers = False  # recompute each layer's activations in backward instead of keeping them

    @property
    def full_shape(self) -> Shape:
        return Shape.full(self.config)

    def forward(
        self,
        input_ids: Tensor,
        shape: Shape | None = None,
        cache: KVCache | None = None,
        loss: HiddenLoss | None = None,
    ) -> Tensor:
        """input_ids: (B, T) token ids -> logits (B, T, V) of the sub-network `shape`
        (None: the full model). The Shape must be valid for this model (`Shape.validate`).

        With a `cache`, input_ids are the tokens that follow the `cache.length` tokens it holds;
        they attend to those too, and are added to it. With a `loss` (of the final hidden states
        and the LM head's weight, such as `anyshape.model.nll.next_token_loss`), the forward
        returns that scalar instead of the logits."""
        shape = shape or self.full_shape
        hidden = self.hidden_states(input_ids, shape, cache)
        if loss is not None:
            return loss(hidden, slice_parameter("lm_head.weight", self.lm_head.weight, self.config, shape))
        return self.lm_head_logits(hidden, shape)

    def hidden_states(
        self, input_ids: Tensor, shape: Shape, cache: KVCache | Sequence[KVCache] | None = None
    ) -> Tensor:
        """input_ids (B, T) -> final-normed hidden states (B, T, H'), after the cache's tokens;
        or, given B caches of batch 1 (continuous batching: sequences of different lengths),
        row b's tokens after cache b's. A MaskedShape runs the full model with its masks
        (H' = H, zero outside the kept channels)."""
        ragged = cache is not None and not isinstance(cache, KVCache)  # one cache per row
        caches = [] if cache is None else list(cache) if ragged else [cache]
        if isinstance(shape, MaskedShape) and caches:
            raise AnyshapeError("a MaskedShape trains a router and cannot decode with a KVCache; pass a Shape")
        for held in caches:
            if held.shape != shape:
                raise AnyshapeError(
                    f"this KVCache holds keys and values of Shape {held.shape.to_json()}, not of {shape.to_json()}; "
                    "start a new KVCache(shape) for another Shape"
                )
        if ragged and len(caches) != input_ids.shape[0]:
            raise AnyshapeError(f"{len(caches)} caches for a batch of {input_ids.shape[0]}; give one per row")
        embedding = slice_parameter("embed_tokens.weight", self.model.embed_tokens.weight, self.config, shape)
        x = F.embedding(input_ids, embedding)  # (B, T, H')
        hidden_mask: Tensor | None = None  # (H,)
        gates: Sequence[LayerGates | None] = [None] * self.config.num_hidden_layers  # by the parent's layer index
        if isinstance(shape, MaskedShape):
            hidden_mask, gates = shape.hidden_mask, shape.layer_gates(self.config)
            x = x * hidden_mask
        T = input_ids.shape[1]
        if ragged:  # each row at its own positions: cos, sin (B, 1, T, d)
            rows = [self.rope(T, x.dtype, held.length) for held in caches]
            rope = torch.stack([cos for cos, _ in rows])[:, None], torch.stack([sin for _, sin in rows])[:, None]
        else:
            rope = self.rope(T, x.dtype, caches[0].length if caches else 0)
        recompute = self.checkpoint_layers and cache is None and torch.is_grad_enabled()
        for i, index in enumerate(shape.layers):
            layer = self.model.layers[index]
            past = [held.layers[i] for held in caches] if ragged else caches[0].layers[i] if caches else None
            if recompute:  # keeps only the layer's input x; the backward runs its forward again
                x = checkpoint(layer, x, rope, shape, past, gates[index], use_reentrant=False)
            else:
                x = layer(x, rope, shape, past, gates[index])
        for held in caches:
            held.length += T
        return self.model.norm(x, shape, hidden_mask)

    def lm_head_logits(self, hidden: Tensor, shape: Shape) -> Tensor:
        """hidden (B, T, H') -> logits (B, T, V)."""
        return F.linear(hidden, slice_parameter("lm_head.weight", self.lm_head.weight, self.config, shape))

    def rope(self, T: int, dtype: torch.dtype, start: int = 0) -> tuple[Tensor, Tensor]:
        """cos, sin of the rotary embedding at positions start..start+T-1, each (T, d)."""
        positions = torch.arange(start, start + T, device=self.inv_freq.device, dtype=torch.float32)
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
