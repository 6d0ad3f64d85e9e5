"""Incremental decoding is exact: prefill, chunks and single tokens through a KVCache give the
logits of one full forward pass, at the full Shape and at a smaller one."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import anyshape
from anyshape import AnyshapeError, Shape
from anyshape.model.llama import KVCache
from tests.conftest import TINY_CONFIGS

SHAPES = {
    "full": lambda c: {},
    "smaller": lambda c: {
        "layers": [0, 2, 3],
        "hidden_size": 48,
        "num_key_value_heads": 1,
        "num_attention_heads": max(1, c.queries_per_group // 2),
        "intermediate_size": 50,
    },
}
# 20 tokens: past the Mistral model's 8-token sliding window, so decoding must apply it too.
INPUT_IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
CHUNKS = (7, 5, 1, 1, 1, 1, 1, 1, 1, 1)  # a prefill, a chunk after it, then one token at a time


@pytest.fixture(scope="module")
def tiny_models(tiny_dir):
    return {name: anyshape.load(tiny_dir(name)) for name in TINY_CONFIGS}


@pytest.fixture(scope="module")
def references(tiny_dir):
    """The same checkpoints in `transformers`: the full Shape's logits must match them too, so
    a mistake shared by the full and the cached pass (e.g. in the window) cannot hide."""
    return {name: AutoModelForCausalLM.from_pretrained(tiny_dir(name)).eval() for name in TINY_CONFIGS}


def incremental_logits(model, shape: Shape, cache: KVCache, input_ids: torch.Tensor, chunks) -> torch.Tensor:
    """Logits (B, sum(chunks), V) of input_ids run through `cache`, `chunks` tokens per call."""
    pieces, start = [], cache.length
    for size in chunks:
        pieces.append(model(input_ids[:, start : start + size], shape, cache=cache))
        start += size
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("case", sorted(SHAPES))
@torch.no_grad()
def test_cached_decoding_equals_the_full_forward(tiny_models, references, name, case):
    model = tiny_models[name]
    shape = Shape.from_dict(SHAPES[case](model.config), model.config)
    expected = model(INPUT_IDS, shape)
    if case == "full":
        torch.testing.assert_close(expected, references[name](INPUT_IDS).logits, atol=1e-4, rtol=0)
    cache = KVCache(shape)
    actual = incremental_logits(model, shape, cache, INPUT_IDS, CHUNKS)
    assert (actual - expected).abs().max() < 1e-5
    assert cache.length == INPUT_IDS.shape[1]
    kv_width = (INPUT_IDS.shape[0], shape.num_key_value_heads, INPUT_IDS.shape[1], model.config.head_dim)
    assert len(cache.layers) == len(shape.layers)
    assert all(layer.keys.shape == layer.values.shape == kv_width for layer in cache.layers)


@torch.no_grad()
def test_a_cropped_cache_continues_from_the_crop(tiny_models):
    model = tiny_models["mistral-window"]
    shape = model.full_shape
    expected = model(INPUT_IDS, shape)
    cache = KVCache(shape)
    model(INPUT_IDS[:, :15], shape, cache=cache)
    cache.crop(10)
    actual = incremental_logits(model, shape, cache, INPUT_IDS, (4, 1, 1, 1, 1, 1, 1))
    assert (actual - expected[:, 10:]).abs().max() < 1e-5
    with pytest.raises(AnyshapeError, match="cannot crop a cache of 20 tokens to 21"):
        cache.crop(21)


@torch.no_grad()
def test_a_cache_belongs_to_one_shape(tiny_models):
    model = tiny_models["qwen2-gqa"]
    cache = KVCache(model.full_shape)
    other = Shape.from_dict({"num_hidden_layers": 2}, model.config)
    with pytest.raises(AnyshapeError, match="start a new KVCache"):
        model(INPUT_IDS, other, cache=cache)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_rows_with_caches_of_their_own_lengths_decode_together(tiny_models, name):
    """Continuous batching: sequences of 3, 9 and 14 tokens (past the sliding window), each
    prefilled alone, then decoded two tokens at a time in one batch of one cache per row, give
    every row the logits of its own full forward."""
    model = tiny_models[name]
    shape = Shape.from_dict(SHAPES["smaller"](model.config), model.config)
    sequence = INPUT_IDS[0]
    lengths = (3, 9, 14)
    caches = [KVCache(shape) for _ in lengths]
    for cache, length in zip(caches, lengths, strict=True):
        model(sequence[None, :length], shape, cache=cache)
    for step in range(2):
        batch = torch.stack([sequence[length + step : length + step + 1] for length in lengths])  # (3, 1)
        logits = model(batch, shape, cache=caches)[:, -1]  # (3, V)
        for row, length in enumerate(lengths):
            expected = model(sequence[None, : length + step + 1], shape)[0, -1]
            assert (logits[row] - expected).abs().max() < 1e-5
    assert [cache.length for cache in caches] == [length + 2 for length in lengths]
    with pytest.raises(AnyshapeError, match="3 caches for a batch of 2"):
        model(batch[:2], shape, cache=caches)
