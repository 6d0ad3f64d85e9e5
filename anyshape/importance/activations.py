"""One calibration pass that records activation statistics with forward hooks.

Per-position statistics (magnitudes, so signs do not cancel):
    neuron j    |act(gate) * up| at j, entering down_proj        (Minitron F_neuron)
    head h      L2 norm over head_dim of the head's attention output, entering o_proj
    channel c   |RMSNorm output| at c, every norm of every layer  (layer inputs)
    layer i     cosine similarity of the layer's input and output hidden states

Each statistic is reduced over the sequence with agg_S and then over the calibration
sequences with agg_B, each one of mean, L2 norm or variance (Minitron, section 2.2). The pass
keeps every agg_S reduction of every sequence, so all nine (agg_B, agg_S) pairs come from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from anyshape.model.config import LlamaFamilyConfig
from anyshape.model.llama import ElasticLlama

AGGREGATIONS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "mean": lambda x, dim: x.mean(dim),
    "norm": lambda x, dim: x.norm(dim=dim),
    "variance": lambda x, dim: x.var(dim, unbiased=False),
}


@dataclass
class ActivationRecord:
    """Per-sequence statistics: per_sequence[(agg_S, unit, module index)] is (N, units);
    `bi` (L,) is Block Importance, 1 - mean cosine(layer input, layer output) over all tokens."""

    config: LlamaFamilyConfig
    per_sequence: dict[tuple[str, str, int], Tensor]
    num_norms: int
    bi: Tensor

    def scores(self, agg_batch: str = "mean", agg_seq: str = "mean") -> dict[str, Tensor]:
        """neurons (L, F), heads (L, G, q), kv_groups (L, G) (sum of their heads), channels (H,)
        (summed over every norm), and bi (L,)."""
        reduce_batch = AGGREGATIONS[agg_batch]

        def aggregated(unit: str, index: int) -> Tensor:
            return reduce_batch(self.per_sequence[(agg_seq, unit, index)], 0)

        c = self.config
        L = c.num_hidden_layers
        heads = torch.stack([aggregated("heads", i) for i in range(L)]).view(
            L, c.num_key_value_heads, c.queries_per_group
        )
        return {
            "neurons": torch.stack([aggregated("neurons", i) for i in range(L)]),
            "heads": heads,
            "kv_groups": heads.sum(-1),
            "channels": torch.stack([aggregated("channels", n) for n in range(self.num_norms)]).sum(0),
            "bi": self.bi,
        }


@torch.no_grad()
def record_activations(
    model: ElasticLlama, input_ids: Tensor, batch_size: int = 4, progress: bool = False
) -> ActivationRecord:
    """Runs the full model on calibration input_ids (N, S) and records every statistic."""
    config = model.config
    # Each (N, units) result is allocated once, at the first batch, and filled in place: small
    # tensors kept across batches would split the allocator's free blocks, and the process
    # would grow by the size of a batch's temporaries at every batch.
    per_sequence: dict[tuple[str, str, int], Tensor] = {}
    cosine_sum = torch.zeros(config.num_hidden_layers, dtype=torch.float64)
    rows = slice(0, 0)  # the calibration sequences of the current batch

    def keep(unit: str, index: int, statistic: Tensor) -> None:  # statistic (B, S, units)
        statistic = statistic.float()
        for agg_seq, reduce in AGGREGATIONS.items():
            key = (agg_seq, unit, index)
            if key not in per_sequence:
                per_sequence[key] = torch.empty(len(input_ids), statistic.shape[-1])
            per_sequence[key][rows] = reduce(statistic, 1)

    def head_norms(out: Tensor) -> Tensor:  # (B, S, Q d) -> (B, S, Q)
        return out.unflatten(-1, (-1, config.head_dim)).norm(dim=-1)

    hooks = []
    num_norms = 0
    for i, layer in enumerate(model.model.layers):
        mlp, attention = layer.mlp.neuron_outputs, layer.self_attn.head_outputs
        hooks.append(mlp.register_forward_hook(lambda m, a, out, i=i: keep("neurons", i, out.abs())))
        hooks.append(attention.register_forward_hook(lambda m, a, out, i=i: keep("heads", i, head_norms(out))))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.append(norm.register_forward_hook(lambda m, a, out, n=num_norms: keep("channels", n, out.abs())))
            num_norms += 1

        def layer_cosine(module, args, out, i=i):
            cosine_sum[i] += F.cosine_similarity(args[0].float(), out.float(), dim=-1).sum().item()

        hooks.append(layer.register_forward_hook(layer_cosine))
    try:
        batches = range(0, len(input_ids), batch_size)
        for start in tqdm(batches, desc="activations", unit="batch", disable=not progress):
            rows = slice(start, start + batch_size)
            model(input_ids[rows].to(model.inv_freq.device))
    finally:
        for hook in hooks:
            hook.remove()
    return ActivationRecord(config, per_sequence, num_norms, (1 - cosine_sum / input_ids.numel()).float())
