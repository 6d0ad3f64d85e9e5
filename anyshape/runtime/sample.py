"""Text a model writes itself: training text that needs no corpus and keeps the model's own
distribution (what a model distilled from it should match).

Each sequence starts at the beginning-of-sequence token and is sampled at temperature 1 with no
nucleus cut, so the text follows the model's distribution rather than its most likely
continuations; sequences run a batch at a time through one KV cache.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import AnyshapeError
from anyshape.model.llama import ElasticLlama, KVCache


@torch.inference_mode()
def sample_tokens(
    model: ElasticLlama, start: int, num_sequences: int, length: int, batch_size: int = 16, seed: int = 0
) -> torch.Tensor:
    """(num_sequences, length) token ids the full model samples after the token `start`, which
    is not included; a pure function of `seed` on a given device."""
    if num_sequences < 1 or length < 1:
        raise AnyshapeError(f"cannot sample {num_sequences} sequences of {length} tokens; give at least 1 of each")
    device = model.inv_freq.device
    generator = torch.Generator(device).manual_seed(seed)  # on the model's device: no copy of the logits per token
    shape = model.full_shape
    batches = []
    with tqdm(total=num_sequences * length, desc="sampling text", unit="tok") as bar:
        for first in range(0, num_sequences, batch_size):
            count = min(batch_size, num_sequences - first)
            cache = KVCache(shape)
            tokens = torch.full((count, 1), start, dtype=torch.long, device=device)  # (b, 1)
            sampled = []
            for _ in range(length):
                hidden = model.hidden_states(tokens, shape, cache)[:, -1]  # (b, H)
                probs = torch.softmax(model.lm_head_logits(hidden, shape).float(), dim=-1)  # (b, V)
                tokens = torch.multinomial(probs, 1, generator=generator)  # (b, 1)
                sampled.append(tokens)
                bar.update(count)
            batches.append(torch.cat(sampled, dim=1))
    return torch.cat(batches).cpu()


def sample_text(
    model: ElasticLlama,
    tokenizer: PreTrainedTokenizerBase,
    num_tokens: int,
    length: int = 256,
    seed: int = 0,
    batch_size: int = 16,
) -> str:
    """About `num_tokens` tokens of text sampled from `model`: sequences of `length` tokens from
    the beginning-of-sequence token, separated by blank lines."""
    ids = sample_tokens(model, start_token(tokenizer), math.ceil(num_tokens / length), length, batch_size, seed)
    texts = tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
    return "\n\n".join(texts)


def start_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token sampled text starts after: beginning-of-sequence, else end-of-sequence."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise AnyshapeError(
            "the tokenizer has no beginning- or end-of-sequence token to start sampling text from; "
            "train on a text instead (--train-text data)"
        )
    return start
