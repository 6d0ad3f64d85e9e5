"""Exact extraction on the embedded SmolLM2-135M (slow: loads the real model)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from anyshape import Shape, export_hf

pytestmark = pytest.mark.slow

ISSUE_EXAMPLE = {  # 20 layers, hidden 448, 6 heads in 2 KV groups, MLP 1024
    "layers": list(range(20)),
    "hidden_size": 448,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "intermediate_size": 1024,
}


@pytest.mark.parametrize(
    "fields",
    [ISSUE_EXAMPLE, {"layers": [0, 5, 10, 29], "hidden_size": 384, "num_attention_heads": 6}],
    ids=["issue-example", "sparse-layers"],
)
def test_exported_sub_network_matches(smollm2, smollm2_tokenizer, tmp_path, fields):
    shape = Shape.from_dict(fields, smollm2.config)
    export_hf(smollm2, shape, tmp_path / "out", tokenizer=smollm2_tokenizer, parent="smollm2-135m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    input_ids = smollm2_tokenizer("Structured pruning keeps the most important units.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, smollm2(input_ids, shape), atol=1e-4, rtol=0)
    assert sum(p.numel() for p in reloaded.parameters()) == shape.num_parameters(smollm2.config)
