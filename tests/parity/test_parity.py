"""The elastic model at the full Shape reproduces `transformers` logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyshape
from tests.conftest import TINY_CONFIGS


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_full_shape_matches_transformers(tiny_dir, name):
    folder = tiny_dir(name)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    model = anyshape.load(folder)
    input_ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = model(input_ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


def test_sliding_window_changes_the_output(tiny_dir):
    """The Mistral case above runs past its 8-token window, so the window is really applied."""
    model = anyshape.load(tiny_dir("mistral-window"))
    input_ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        windowed = model(input_ids)
        object.__setattr__(model.config, "sliding_window", None)
        try:
            full = model(input_ids)
        finally:
            object.__setattr__(model.config, "sliding_window", 8)
    torch.testing.assert_close(windowed[:, :8], full[:, :8])
    assert (windowed[:, 8:] - full[:, 8:]).abs().max() > 1e-3


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2, smollm2_tokenizer):
    path = anyshape.model.load.resolve("smollm2-135m")
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    input_ids = smollm2_tokenizer("The capital of France is Paris, and the capital of", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(input_ids).logits
        actual = smollm2(input_ids)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
