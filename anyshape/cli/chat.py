"""`anyshape chat`: talk to a model (or a Shape of it), answers streamed as they are generated."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from anyshape.checkpoints import load, load_config, load_tokenizer
from anyshape.cli.app import app
from anyshape.cli.options import ModelArg, ShapeOpt
from anyshape.runtime.chat import Chat
from anyshape.runtime.generate import Sampling
from anyshape.shape import Shape

PROMPT = ">>> "
EXIT = "/exit"


@app.command()
def chat(
    model: ModelArg,
    shape: ShapeOpt = None,
    prompt: Annotated[
        str | None,
        typer.Option(help="Answer this one message and exit (no interactive session).", show_default=False),
    ] = None,
    system: Annotated[
        str | None, typer.Option(help="System message that opens the conversation.", show_default=False)
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens in one answer.")] = 256,
    temperature: Annotated[float, typer.Option(help="0: greedy (deterministic); > 0: sample, e.g. 0.7.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Sample only from the smallest token set of this probability.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Seed of the sampler (sampled answers are reproducible).")] = 0,
) -> None:
    """Chat with MODEL (or a SHAPE of it), through its tokenizer's chat template.

    Answers stream to stdout. With --prompt, one answer and exit; otherwise type messages at
    the '>>> ' prompt; the conversation is kept until /exit, Ctrl-D or Ctrl-C. A tokenizer
    without a chat template is used for plain text continuation (said on stderr).

    \b
    Examples:
      anyshape chat family/0.5
      anyshape chat smollm2-135m --shape shape.json --prompt "Explain GQA in one line" --max-new-tokens 64
    """
    sampling = Sampling(temperature, top_p, seed)  # checked before the slow load
    if prompt is not None and not prompt.strip():
        raise typer.BadParameter("the message is empty; write something to answer", param_hint="--prompt")
    config = load_config(model)
    chosen = Shape.parse(shape, config) if shape is not None else Shape.full(config)
    conversation = Chat(load(model), load_tokenizer(model), chosen, system)
    if not conversation.templated:
        print(
            f"anyshape: note: the tokenizer of {model} has no chat template, so the model continues "
            "the conversation as plain text (each message on a new line)",
            file=sys.stderr,
        )
    if prompt is not None:
        answer(conversation, prompt, max_new_tokens, sampling)
        return
    print(f"Chatting with {model}; {EXIT}, Ctrl-D or Ctrl-C ends the conversation.", file=sys.stderr)
    try:
        while (message := input(PROMPT).strip()) != EXIT:
            if message:
                answer(conversation, message, max_new_tokens, sampling)
    except (EOFError, KeyboardInterrupt):
        print()  # end the prompt's (or the interrupted answer's) line


def answer(conversation: Chat, message: str, max_new_tokens: int, sampling: Sampling) -> None:
    """Prints the answer to `message` piece by piece as it is generated, then a newline."""
    for piece in conversation.reply(message, max_new_tokens, sampling):
        print(piece, end="", flush=True)
    print()
