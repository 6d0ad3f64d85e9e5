"""Hard-concrete masks for every prunable structure of one parent model (Sheared LLaMA).

Structures and their gates (L layers, H channels, G KV groups of q query heads, F neurons):

    layers      z_layer   (L,)        a whole decoder layer
    hidden      z_hidden  (H,)        an embedding channel, shared by the residual stream
    kv_groups   z_group   (L, G)      a KV group of one layer, with its query heads
    heads       z_head    (L, G, q)   a query head inside its group
    neurons     z_neuron  (L, F)      an MLP neuron of one layer

GQA-aware: query head (l, g, i) runs with z_group[l, g] * z_head[l, g, i], so it is kept only if
its group is, and dropping a group drops its key/value heads and all its query heads. The gates are
independent, so the expected sizes (CoFi / Sheared LLaMA, with p = P(z > 0)) are

    E[L']      = sum_l p_layer[l]                    E[H'] = sum_c p_hidden[c]
    E[G'_l]    = sum_g p_group[l, g]                 E[F'_l] = sum_f p_neuron[l, f]
    E[Q'_l]    = sum_g p_group[l, g] sum_i p_head[l, g, i]
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.masks import MaskedShape
from anyshape.prune.hard_concrete import HardConcrete

STRUCTURES = ("layers", "hidden", "kv_groups", "heads", "neurons")


class PruningMasks(nn.Module):
    """One HardConcrete gate set per structure of `config`; `init_keep` is the initial P(z > 0)."""

    def __init__(self, config: LlamaFamilyConfig, init_keep: float = 0.9):
        super().__init__()
        self.config = config
        L, G, q = config.num_hidden_layers, config.num_key_value_heads, config.queries_per_group
        sizes = {
            "layers": (L,),
            "hidden": (config.hidden_size,),
            "kv_groups": (L, G),
            "heads": (L, G, q),
            "neurons": (L, config.intermediate_size),
        }
        self.gates = nn.ModuleDict({name: HardConcrete(sizes[name], init_keep) for name in STRUCTURES})

    def scores(self) -> dict[str, Tensor]:
        """structure -> its log_alpha (higher = keep), detached."""
        return {name: gate.log_alpha.detach() for name, gate in self.gates.items()}

    def sample(self, training: bool = True, generator: torch.Generator | None = None) -> MaskedShape:
        """The masks as a MaskedShape for `model(input_ids, shape=...)`: a reparameterised sample
        when training, else the deterministic masks. features (5,): the expected-size fractions."""
        z = {name: gate.sample(generator) if training else gate.deterministic() for name, gate in self.gates.items()}
        heads = z["kv_groups"].unsqueeze(-1) * z["heads"]  # (L, G, q)
        return MaskedShape.of(
            self.config,
            layer_mask=z["layers"],
            hidden_mask=z["hidden"],
            head_mask=heads.flatten(1),  # (L, Q) in (G, q) order
            neuron_mask=z["neurons"],
            features=self.features(),
        )

    def expected_sizes(self) -> dict[str, Tensor]:
        """Expected kept units, differentiable, under the target field names: num_hidden_layers (),
        hidden_size (), and per layer (L,): num_key_value_heads, num_attention_heads, intermediate_size."""
        p = {name: gate.keep_probability() for name, gate in self.gates.items()}
        return {
            "num_hidden_layers": p["layers"].sum(),
            "hidden_size": p["hidden"].sum(),
            "num_attention_heads": (p["kv_groups"] * p["heads"].sum(-1)).sum(-1),
            "num_key_value_heads": p["kv_groups"].sum(-1),
            "intermediate_size": p["neurons"].sum(-1),
        }

    def expected_fractions(self) -> dict[str, Tensor]:
        """`expected_sizes` divided by the parent's sizes, so every structure is on a 0..1 scale."""
        return {name: size / getattr(self.config, name) for name, size in self.expected_sizes().items()}

    @torch.no_grad()
    def features(self) -> Tensor:
        """(5,) expected fractions in `shape_features` order: depth, hidden, KV groups, query heads
        per group, MLP neurons (layer means for the per-layer sizes)."""
        e = {name: size.mean() for name, size in self.expected_sizes().items()}
        c = self.config
        per_group = e["num_attention_heads"] / e["num_key_value_heads"].clamp_min(1e-6) / c.queries_per_group
        return torch.stack(
            [
                e["num_hidden_layers"] / c.num_hidden_layers,
                e["hidden_size"] / c.hidden_size,
                e["num_key_value_heads"] / c.num_key_value_heads,
                per_group,
                e["intermediate_size"] / c.intermediate_size,
            ]
        )
