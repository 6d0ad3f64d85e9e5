"""One calibration pass that records activation statistics with forward hooks.

Per-position statistics (magnitudes, so signs do not cancel):
    neuron j    |act(gate) * up| at j, entering down_proj        (Minitron F_neuron)
    head h      L2 norm over head_dim of the head's attention output, entering o_proj
    channel c   |RMSNorm output| at c, every norm of every layer  (layer inputs)
    layer i     cosine similarity of the layer's input and output hidden states

Each statistic is reduced over the sequence with agg_S and then over the calibration
sequences with agg_B, each one of mean, L2 norm or variance (Minitron, section 2.2).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from anyshape.model.llama import ElasticLlama

AGGREGATIONS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "mean": lambda x, dim: x.mean(dim),
    "norm": lambda x, dim: x.norm(dim=dim),
    "variance": lambda x, dim: x.var(dim, unbiased=False),
}


@torch.no_grad()
def record_activations(
    model: ElasticLlama,
    input_ids: Tensor,
    agg_batch: str = "mean",
    agg_seq: str = "mean",
    batch_size: int = 4,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Runs the full model on input_ids (N, S) and returns activation scores:
    neurons (L, F), heads (L, G, q), kv_groups (L, G) (sum of their heads), channels (H,), and
    block importance `bi` (L,) = 1 - mean cosine(layer input, layer output) over all tokens."""
    for name in (agg_batch, agg_seq):
        if name not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {name!r}; choose one of {', '.join(AGGREGATIONS)}")
    reduce_seq = AGGREGATIONS[agg_seq]
    config = model.config
    per_sequence: dict[tuple[str, int], list[Tensor]] = defaultdict(list)  # (unit, module) -> [(B, n)]
    cosine_sum = torch.zeros(config.num_hidden_layers, dtype=torch.float64)

    def keep(key: tuple[str, int], statistic: Tensor) -> None:  # statistic (B, S, n)
        per_sequence[key].append(reduce_seq(statistic.float(), 1).cpu())

    hooks = []
    norm_index = 0
    for i, layer in enumerate(model.model.layers):
        hooks.append(
            layer.mlp.neuron_outputs.register_forward_hook(lambda m, args, out, i=i: keep(("neurons", i), out.abs()))
        )
        hooks.append(
            layer.self_attn.head_outputs.register_forward_hook(
                lambda m, args, out, i=i: keep(("heads", i), out.unflatten(-1, (-1, config.head_dim)).norm(dim=-1))
            )
        )
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.append(
                norm.register_forward_hook(lambda m, args, out, n=norm_index: keep(("channels", n), out.abs()))
            )
            norm_index += 1

        def layer_cosine(m, args, out, i=i):
            cosine_sum[i] += F.cosine_similarity(args[0].float(), out.float(), dim=-1).sum().item()

        hooks.append(layer.register_forward_hook(layer_cosine))
    try:
        for start in tqdm(range(0, len(input_ids), batch_size), desc="activations", unit="batch", disable=not progress):
            model(input_ids[start : start + batch_size].to(model.inv_freq.device))
    finally:
        for hook in hooks:
            hook.remove()

    reduce_batch = AGGREGATIONS[agg_batch]

    def aggregated(key: tuple[str, int]) -> Tensor:
        return reduce_batch(torch.cat(per_sequence[key]), 0)

    L = config.num_hidden_layers
    heads = torch.stack([aggregated(("heads", i)) for i in range(L)]).view(
        L, config.num_key_value_heads, config.queries_per_group
    )
    return {
        "neurons": torch.stack([aggregated(("neurons", i)) for i in range(L)]),
        "heads": heads,
        "kv_groups": heads.sum(-1),
        "channels": torch.stack([aggregated(("channels", n)) for n in range(norm_index)]).sum(0),
        "bi": (1 - cosine_sum / input_ids.numel()).float(),
    }
