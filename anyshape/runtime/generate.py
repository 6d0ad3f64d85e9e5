"""Token generation with the elastic model at any Shape: greedy or sampled, one token at a time
through a KV cache, at batch 1.

    prompt  ->  one forward over its tokens (prefill), filling the cache
            ->  choose a token from the last logits; stop at a stop token or after N tokens
            ->  run that single token through the cache; repeat

Only the last position's logits are computed (the LM head is the largest matrix of a small
model). `Decoder` keeps its cache between calls, so a conversation's next turn runs only the
tokens that its cache does not already hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import AnyshapeError
from anyshape.model.llama import ElasticLlama, KVCache
from anyshape.shape import Shape


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits.

    temperature  0: greedy (the most likely token); > 0: sample from softmax(logits / temperature)
    top_p        sample only among the most likely tokens whose probabilities sum to top_p (nucleus)
    seed         of the sampler, so a sampled answer can be reproduced
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):
            raise AnyshapeError(f"temperature={self.temperature} must be >= 0 (0: greedy; e.g. 0.7 to sample)")
        if not 0 < self.top_p <= 1:
            raise AnyshapeError(f"top_p={self.top_p} must be in (0, 1] (1: no nucleus cut; e.g. 0.9)")


def next_token(logits: Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The token chosen from logits (V,) of one position."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # (V,)
    probs, order = probs.sort(descending=True)
    mass_before = probs.cumsum(0) - probs  # of the tokens more likely than each
    probs[mass_before >= sampling.top_p] = 0  # the nucleus: the fewest tokens whose mass reaches top_p
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(order[choice])


class Decoder:
    """A model at one Shape with a KV cache of the tokens it has run (batch 1).

    Each `generate` call reuses the cache for the longest prefix of its prompt that the cache
    holds (the earlier turns of a conversation) and runs only the rest.
    """

    def __init__(self, model: ElasticLlama, shape: Shape | None = None):
        self.model = model
        self.shape = (shape or model.full_shape).validate(model.config)
        self.cache = KVCache(self.shape)
        self.tokens: list[int] = []  # what the cache holds, position by position

    @torch.inference_mode()
    def generate(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        sampling: Sampling = Sampling(),  # noqa: B008  (frozen, so never mutated)
        stop_tokens: Iterable[int] = (),
    ) -> Iterator[int]:
        """Yields the new tokens one by one as they are chosen, until a stop token (not yielded)
        or `max_new_tokens` of them."""
        if not prompt:
            raise AnyshapeError("the prompt is empty; give at least one token")
        if max_new_tokens < 1:
            raise AnyshapeError(f"max_new_tokens={max_new_tokens} must be at least 1")
        stop = frozenset(stop_tokens)
        generator = torch.Generator().manual_seed(sampling.seed)
        reused = _common_prefix(self.tokens, prompt[:-1])  # the last token is run anyway: its logits are needed
        self.cache.crop(reused)
        del self.tokens[reused:]
        logits = self.run(prompt[reused:])
        for step in range(max_new_tokens):
            token = next_token(logits, sampling, generator)
            if token in stop:
                return
            yield token
            if step + 1 < max_new_tokens:
                logits = self.run([token])

    @torch.inference_mode()
    def run(self, tokens: Sequence[int]) -> Tensor:
        """Runs `tokens` after the cached ones (all of them in one forward) and adds them to the
        cache; returns the last one's logits (V,)."""
        input_ids = torch.tensor([list(tokens)], device=self.model.inv_freq.device)  # (1, T)
        hidden = self.model.hidden_states(input_ids, self.shape, self.cache)[:, -1]  # (1, H')
        self.tokens += tokens
        return self.model.lm_head_logits(hidden, self.shape)[0]


def generate(
    model: ElasticLlama,
    prompt: Sequence[int],
    shape: Shape | None = None,
    max_new_tokens: int = 128,
    sampling: Sampling = Sampling(),  # noqa: B008  (frozen, so never mutated)
    stop_tokens: Iterable[int] = (),
) -> Iterator[int]:
    """The tokens `model` at `shape` (None: the full model) generates after `prompt` token ids,
    one by one; see `Decoder.generate`."""
    return Decoder(model, shape).generate(prompt, max_new_tokens, sampling, stop_tokens)


class TextStream:
    """Text of tokens given one at a time, in pieces, each as soon as it is whole: a token that
    ends inside a multi-byte character (decoded as U+FFFD) waits for the tokens that complete it.
    Special tokens are left out. The pieces join to `tokenizer.decode(tokens, skip_special_tokens=True)`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.shown = ""  # the text of the pieces given so far

    def push(self, token: int) -> str:
        """The new whole text after `token` ("" while a character is incomplete)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece

    def flush(self) -> str:
        """The rest of the text, once the tokens have ended (inside a character, perhaps)."""
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        piece, self.shown = text[len(self.shown) :], text
        return piece


def stream_text(tokenizer: PreTrainedTokenizerBase, tokens: Iterable[int]) -> Iterator[str]:
    """The text of `tokens` in non-empty pieces as `TextStream` gives them."""
    stream = TextStream(tokenizer)
    for token in tokens:
        if piece := stream.push(token):
            yield piece
    if piece := stream.flush():
        yield piece


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
