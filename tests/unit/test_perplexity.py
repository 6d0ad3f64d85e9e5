"""The perplexity protocol: every token scored once, and the value a direct computation gives."""

import math

import pytest
import torch
import torch.nn.functional as F

import anyshape
from anyshape import DataError, Shape
from anyshape.evaluate.perplexity import perplexity, tokenize, windows


@pytest.mark.parametrize(("n", "window", "stride"), [(10, 4, 3), (10, 4, 1), (37, 8, 3), (5, 16, 8), (17, 8, 7)])
def test_overlapping_windows_score_every_token_after_the_first_once(n, window, stride):
    scored = []
    for index, w in enumerate(windows(n, window, stride)):
        assert w.end - w.start <= window and w.start < w.first_target <= w.end
        if index > 0:
            assert w.first_target - w.start >= window - stride  # guaranteed context
        scored += range(w.first_target, w.end)
    assert scored == list(range(1, n))


def test_default_protocol_is_64_disjoint_windows_of_512():
    """The project's WikiText-2 protocol: 32,704 scored tokens, each window's first unscored."""
    all_windows = windows(32_768)
    assert len(all_windows) == 64
    assert [(w.start, w.end, w.first_target) for w in all_windows[:2]] == [(0, 512, 1), (512, 1024, 513)]
    assert sum(w.end - w.first_target for w in all_windows) == 32_704


def test_protocol_errors():
    with pytest.raises(DataError, match="at least 2"):
        windows(1)
    with pytest.raises(DataError, match="stride=9"):
        windows(100, window=8, stride=9)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return anyshape.load(tiny_dir("qwen2-gqa"))


def direct_perplexity(model, ids, shape, window, stride):
    """exp(mean NLL) computed window by window without batching."""
    nll, count = 0.0, 0
    for w in windows(len(ids), window, stride):
        with torch.no_grad():
            logits = model(ids[None, w.start : w.end], shape)[0]
        for target in range(w.first_target, w.end):
            nll += F.cross_entropy(logits[target - w.start - 1], ids[target]).item()
            count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize(("window", "stride"), [(64, 64), (16, 16), (16, 5)])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_a_direct_computation(model, window, stride, batch_size):
    ids = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(0))
    shape = Shape.from_dict({"num_hidden_layers": 2, "hidden_size": 40}, model.config)
    for chosen in (None, shape):
        result = perplexity(model, ids, chosen, window=window, stride=stride, batch_size=batch_size)
        assert result.tokens == sum(w.end - w.first_target for w in windows(50, window, stride))
        assert result.perplexity == pytest.approx(direct_perplexity(model, ids, chosen, window, stride), rel=1e-5)


def test_tokenize_truncates(tiny_dir):
    tokenizer = anyshape.load_tokenizer(tiny_dir("qwen2-gqa"))
    ids = tokenize(tokenizer, "hello world", max_tokens=4)
    assert tokenizer.decode(ids) == "hell"
    assert len(tokenize(tokenizer, "hello world")) == len("hello world")
