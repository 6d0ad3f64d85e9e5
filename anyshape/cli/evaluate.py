"""`anyshape eval`: perplexity of a model, or of a Shape of it, on a text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anyshape.cli.app import JsonOpt, ModelArg, ShapeOpt, app, emit
from anyshape.data.text import DEFAULT_TEXT_NAME, load_text
from anyshape.evaluate import perplexity as ppl_protocol
from anyshape.model.load import load, load_config, load_tokenizer
from anyshape.shape import Shape


@app.command("eval")
def evaluate(
    model: ModelArg,
    shape: ShapeOpt = None,
    ppl: Annotated[bool, typer.Option("--ppl/--no-ppl", help="Measure perplexity.")] = True,
    data: Annotated[
        Path | None,
        typer.Option(
            help=f'A .txt or .jsonl ("text" field) file. Default: {DEFAULT_TEXT_NAME}.',
            metavar="FILE",
            show_default=False,
        ),
    ] = None,
    window: Annotated[int, typer.Option(help="Tokens per window.", min=2)] = ppl_protocol.WINDOW,
    stride: Annotated[
        int | None,
        typer.Option(
            help="Tokens between window starts (<= window). Default: the window (disjoint windows).",
            min=1,
            show_default=False,
        ),
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="Tokens of the text to use.", min=2)] = ppl_protocol.MAX_TOKENS,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate MODEL (or SHAPE of it): perplexity by a sliding window over a text.

    Windows of WINDOW tokens start every STRIDE tokens; each scores the tokens no earlier
    window scored, except its own first token. Perplexity = exp(mean negative
    log-likelihood). By default the windows are disjoint (STRIDE = WINDOW); a smaller
    STRIDE gives every token at least WINDOW - STRIDE tokens of context, at more cost.

    \b
    Example: anyshape eval out/small --ppl --json
    """
    if not ppl:
        raise typer.BadParameter("nothing to evaluate; pass --ppl", param_hint="--ppl")
    if stride is None:  # the protocol's default, disjoint windows, at any window
        stride = window
    if stride > window:
        raise typer.BadParameter(
            f"stride {stride} is larger than window {window}, so tokens between windows would be "
            f"skipped; pass a --stride of at most {window} or a larger --window",
            param_hint="--stride",
        )
    # Everything that can fail fast does so before the slow load.
    chosen = Shape.parse(shape, load_config(model)) if shape is not None else None
    text = load_text(data)
    token_ids = ppl_protocol.tokenize(load_tokenizer(model), text, max_tokens)
    ppl_protocol.windows(len(token_ids), window, stride)  # a too-short text fails here
    elastic = load(model)
    result = ppl_protocol.perplexity(elastic, token_ids, chosen, window, stride, progress=True)
    chosen = chosen or elastic.full_shape
    emit(
        {
            "model": model,
            "shape": chosen.to_dict(),
            "num_parameters": chosen.num_parameters(elastic.config),
            "data": str(data) if data else DEFAULT_TEXT_NAME,
            **result.to_dict(),
        },
        as_json,
    )
