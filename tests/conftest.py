"""Tiny random Llama-family checkpoints built offline, and the embedded SmolLM2 for slow tests."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

DEFAULT_THREADS = torch.get_num_threads()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    """Tests on the tiny models run on one thread (their fixtures too): their matrices are too
    small to gain from more, and where another process uses the cores too, two sets of OpenMP
    threads waiting on each other made the fast run several times slower (11 minutes instead of
    2 beside a training run). Tests marked slow, on the real SmolLM2, keep torch's default."""
    torch.set_num_threads(DEFAULT_THREADS if item.get_closest_marker("slow") else 1)


TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    head_dim=16,
    max_position_embeddings=256,
)

TINY_CONFIGS: dict[str, PretrainedConfig] = {
    "llama-mha-tied": LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3-gqa": LlamaConfig(
        **TINY,
        num_attention_heads=8,  # 8 heads of head_dim 16: q_proj is wider than hidden_size
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral-window": MistralConfig(
        **TINY, num_attention_heads=4, num_key_value_heads=2, sliding_window=8, tie_word_embeddings=False
    ),
    "qwen2-gqa": Qwen2Config(**TINY, num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=True),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with exactly 256 tokens (one per byte), made in memory."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: index for index, symbol in enumerate(sorted(alphabet))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def build_tiny(name: str, seed: int = 0) -> AutoModelForCausalLM:
    """A random `transformers` model of TINY_CONFIGS[name], norms randomised too."""
    config = TINY_CONFIGS[name]
    for field, value in TINY.items():  # typos in config kwargs pass silently; check them
        assert getattr(config, field) == value, field
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
            elif parameter_name.endswith("bias"):
                parameter.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> callable:
    """tiny_dir(name) -> a saved HF folder (safetensors + byte tokenizer) of that tiny model."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            folder = tmp_path_factory.mktemp(name)
            build_tiny(name).save_pretrained(folder)
            byte_tokenizer().save_pretrained(folder)
            cache[name] = folder
        return cache[name]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M as an ElasticLlama (loaded once per session)."""
    import anyshape

    return anyshape.load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    import anyshape

    return anyshape.load_tokenizer("smollm2-135m")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: str | Path) -> None:
    """`path` is a whole PNG image that shows something: the signature, an IHDR chunk first with
    a nonzero width and height, and (decoded with matplotlib) pixels of more than one colour."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert kind == b"IHDR" and length == 13, f"{path}: the first chunk is not IHDR"
    assert width > 0 and height > 0, f"{path} is {width}x{height} pixels"
    assert data.endswith(b"IEND\xaeB`\x82"), f"{path} is cut short (no IEND chunk)"
    try:
        from matplotlib.image import imread
    except ImportError:  # no decoder: a blank image compresses to almost nothing
        assert len(data) > 2_000, f"{path} holds {len(data)} bytes, too few for a plot"
        return
    pixels = imread(path)
    assert pixels.shape[:2] == (height, width), f"{path} decodes to {pixels.shape}, its header says {width}x{height}"
    colours = pixels.reshape(-1, pixels.shape[-1] if pixels.ndim == 3 else 1)
    assert (colours != colours[0]).any(), f"{path} is blank: every pixel has one colour"


def hf_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored token) of each window of the sliding-window protocol
    (docs/evaluate.md), written out again here so that the reference does not use anyshape's."""
    end = min(window, num_tokens)
    spans = [(0, end, 1)]
    while end < num_tokens:
        new_end = min(end + stride, num_tokens)
        start = max(0, new_end - window)
        spans.append((start, new_end, max(end, start + 1)))
        end = new_end
    return spans


@torch.no_grad()
def reference_perplexity(
    model_dir: str | Path,
    text: str | torch.Tensor,
    window: int = 512,
    stride: int | None = None,
    max_tokens: int = 32_768,
    layers: tuple[int, ...] | None = None,
) -> float:
    """The perplexity of the checkpoint in `model_dir` computed with `transformers` alone
    (AutoModelForCausalLM, AutoTokenizer), one window at a time: exp of the mean next-token NLL.

    `text` a string: its first `max_tokens` tokens (no special tokens) by the sliding-window
    protocol of `anyshape evaluate` (windows of `window` tokens every `stride`, each token after
    the first scored once). `text` token rows (N, S): every position after the first of each row.
    `layers`: keep only those decoder layers (the full width), as a depth selection does."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if layers is not None:
        model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in layers)
        model.config.num_hidden_layers = len(layers)
    if isinstance(text, str):
        ids = AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"][:max_tokens]
        ids = torch.tensor(ids)
        spans = hf_windows(len(ids), window, stride or window)
        pieces = [(ids[start:end], first - start) for start, end, first in spans]
    else:
        pieces = [(row, 1) for row in text]
    nll, count = 0.0, 0
    for piece, first in pieces:
        logits = model(piece[None], use_cache=False).logits[0].float()
        nll += F.cross_entropy(logits[first - 1 : -1], piece[first:], reduction="sum").item()
        count += len(piece) - first
    return math.exp(nll / count)


@pytest.fixture(scope="session")
def hf_perplexity():
    """hf_perplexity(model_dir, text, window=512, stride=window, max_tokens=32768, layers=None):
    reference_perplexity, the independent computation a reported perplexity must match."""
    return reference_perplexity
