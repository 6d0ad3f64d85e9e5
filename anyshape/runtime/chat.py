"""A conversation with a model at one Shape.

With a chat template (the tokenizer's `chat_template`), each turn renders the whole conversation
as the model was trained to read it, ending in the assistant's cue. Without one, the
conversation is plain text that the model continues: each message goes on a new line and the
answer follows it. Either way the `Decoder` reuses its cache for the part of the conversation
it has already run.
"""

from __future__ import annotations

from collections.abc import Iterator

from jinja2.exceptions import TemplateError
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import AnyshapeError
from anyshape.model.llama import ElasticLlama
from anyshape.runtime.generate import Decoder, Sampling, stream_text
from anyshape.shape import Shape


def stop_tokens(tokenizer: PreTrainedTokenizerBase, model: ElasticLlama) -> frozenset[int]:
    """The end-of-sequence ids of the tokenizer and of the model's config (one id or a list)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.config.hf, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return frozenset(i for i in ids if i is not None)


class Chat:
    """The messages so far and a Decoder that answers the next one."""

    def __init__(
        self,
        model: ElasticLlama,
        tokenizer: PreTrainedTokenizerBase,
        shape: Shape | None = None,
        system: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.decoder = Decoder(model, shape)
        self.stop = stop_tokens(tokenizer, model)
        self.templated = getattr(tokenizer, "chat_template", None) is not None
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def reply(self, message: str, max_new_tokens: int = 256, sampling: Sampling = Sampling()) -> Iterator[str]:  # noqa: B008
        """Streams the answer to `message` as text pieces; once it is complete, the message and
        the answer join the conversation."""
        prompt = prompt_tokens(self.tokenizer, [*self.messages, {"role": "user", "content": message}])
        answer: list[int] = []

        def recorded() -> Iterator[int]:
            for token in self.decoder.generate(prompt, max_new_tokens, sampling, self.stop):
                answer.append(token)
                yield token

        yield from stream_text(self.tokenizer, recorded())
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        self.messages += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """The token ids a model reads before its answer to the last of `messages`: rendered by the
    tokenizer's chat template, ending in the assistant's cue; without one, the contents on
    separate lines as plain text."""
    if getattr(tokenizer, "chat_template", None) is None:
        return tokenizer("\n".join(m["content"] for m in messages))["input_ids"]
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    except TemplateError as error:
        raise AnyshapeError(
            f"the model's chat template refuses this conversation ({error}); "
            "if it names the system role, leave out the system message"
        ) from None
    return list(encoded["input_ids"])
