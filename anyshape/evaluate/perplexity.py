"""Perplexity by the sliding-window protocol.

Protocol (fixed and recorded with every result):
  1. Tokenize the whole text once, without special tokens; keep the first `max_tokens` tokens.
  2. The first window is the first `window` tokens. Each later window takes the next `stride`
     tokens and ends at the last of them, `window` tokens long. A window scores the tokens no
     earlier window scored, except its own first token, which has no context there.
  3. Perplexity = exp(mean negative log-likelihood over the scored tokens), in nats, fp32.
Defaults: window 512, stride 512, 32,768 tokens: 64 disjoint windows, 32,704 scored tokens,
the WikiText-2 benchmark protocol of docs/evaluate.md. A stride
below the window scores every token after the first, each with at least `window - stride`
tokens of context, at proportionally more cost.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import DataError
from anyshape.model.llama import ElasticLlama
from anyshape.shape import Shape

WINDOW = 512
STRIDE = WINDOW
MAX_TOKENS = 32_768


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens: int  # scored tokens
    window: int
    stride: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Window:
    start: int  # first input token
    end: int  # one past the last input token
    first_target: int  # first scored token; targets are [first_target, end)


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int = MAX_TOKENS) -> Tensor:
    """Token ids (N,) of `text`, truncated to `max_tokens`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def windows(num_tokens: int, window: int = WINDOW, stride: int = STRIDE) -> list[Window]:
    """The protocol's windows over `num_tokens` tokens."""
    if not 0 < stride <= window:
        raise DataError(f"stride={stride} must be in 1..window ({window})")
    if num_tokens < 2:
        raise DataError(f"the text has {num_tokens} token(s); perplexity needs at least 2")
    end = min(window, num_tokens)
    result = [Window(0, end, 1)]
    while end < num_tokens:
        new_end = min(end + stride, num_tokens)
        start = max(0, new_end - window)
        result.append(Window(start, new_end, max(end, start + 1)))
        end = new_end
    return result


@torch.no_grad()
def perplexity(
    model: ElasticLlama,
    token_ids: Tensor,
    shape: Shape | None = None,
    window: int = WINDOW,
    stride: int = STRIDE,
    batch_size: int = 4,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of `model` (at `shape`) on token_ids (N,) by the module's protocol."""
    if shape is not None:
        shape.validate(model.config)
    device = next(model.parameters()).device
    all_windows = windows(len(token_ids), window, stride)
    total_nll, total_tokens = 0.0, 0
    with tqdm(total=len(all_windows), desc="perplexity", unit="window", disable=not progress) as bar:
        for batch in _batches(all_windows, batch_size):
            inputs = torch.stack([token_ids[w.start : w.end] for w in batch]).to(device)  # (B, T)
            logits = model(inputs, shape).float()  # (B, T, V)
            for row, w in enumerate(batch):
                targets = token_ids[w.first_target : w.end].to(device)
                predictions = logits[row, w.first_target - w.start - 1 : w.end - w.start - 1]
                total_nll += F.cross_entropy(predictions, targets, reduction="sum").item()
                total_tokens += len(targets)
            bar.update(len(batch))
    mean_nll = total_nll / total_tokens
    return PerplexityResult(math.exp(mean_nll), mean_nll, total_tokens, window, stride)


def _batches(all_windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most `batch_size` per batch."""
    batches: list[list[Window]] = []
    for w in all_windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0].end - last[0].start == w.end - w.start:
            last.append(w)
        else:
            batches.append([w])
    return batches
