"""Importance sorting of the embedded SmolLM2-135M is exact (slow: loads the real model)."""

import copy

import pytest
import torch
from torch import Tensor

from anyshape import Shape
from anyshape.data.calibration import calibration_ids
from anyshape.data.text import default_text
from anyshape.importance.permute import sort_
from anyshape.importance.scores import Scores, score

pytestmark = pytest.mark.slow

PROMPT = "Structured pruning keeps the most important units."
HALF_WIDTH = {"hidden_size": 448, "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 768}


@pytest.fixture(scope="module")
def activation_scores(smollm2, smollm2_tokenizer) -> Scores:
    calibration = calibration_ids(smollm2_tokenizer, default_text(), num_sequences=4, sequence_length=64, seed=0)
    return score(smollm2, calibration, metric="activation")


@pytest.fixture(scope="module")
def prompt(smollm2_tokenizer) -> Tensor:
    return smollm2_tokenizer(PROMPT, return_tensors="pt").input_ids  # (1, T)


# float32 rounding alone moves SmolLM2's logits by about 5e-5 from their float64 values, so a
# reordered sum differs by that much; in float64 any real change would stand out.
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-4), (torch.float64, 1e-9)], ids=["fp32", "fp64"])
@torch.no_grad()
def test_sorting_keeps_the_logits(smollm2, activation_scores, prompt, dtype, tolerance):
    model = copy.deepcopy(smollm2).to(dtype)  # the session fixture stays unsorted
    before = model(prompt)
    sort_(model, activation_scores)
    assert (model(prompt) - before).abs().max().item() < tolerance


@torch.no_grad()
def test_sorting_changes_what_a_prefix_keeps(smollm2, activation_scores, prompt):
    model = copy.deepcopy(smollm2)
    shape = Shape.from_dict(HALF_WIDTH, model.config)
    before = model(prompt, shape)
    sorted_scores = sort_(model, activation_scores)
    assert (model(prompt, shape) - before).abs().max().item() > 1e-2
    neurons = sorted_scores.neurons  # (L, F), most important first in every layer
    assert (neurons[:, :-1] >= neurons[:, 1:]).all()
