"""The `anyshape` command's Typer app, its global options, and printing results (the shared options are in
anyshape.cli.options)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="anyshape",
    help="Turn one pretrained Llama-family LLM into a family of smaller, standard LLMs.\n\n"
    "MODEL is a Hugging Face folder (safetensors), a .gguf file, the embedded default "
    "'smollm2-135m', or a run folder of `anyshape train`. SHAPE is inline JSON or a JSON file "
    "with Hugging Face config field names plus 'layers' (kept layer indices); omitted widths "
    "stay the parent's.\n\n"
    "\b\nExamples:\n"
    "  anyshape info smollm2-135m --json\n"
    "  anyshape extract smollm2-135m --shape '{\"num_hidden_layers\": 20}' --out out/small\n"
    "  anyshape evaluate out/small --ppl --json",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _global_options(
    ctx: typer.Context,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Read pickle weights (pytorch_model.bin, .pt) with torch.load(weights_only=True), which are "
            "refused otherwise. For trusted files only: a pickle can run code. Give it before the command.",
        ),
    ] = False,
) -> None:
    if allow_pickle:
        from anyshape.model.load import allowing_pickle

        ctx.with_resource(allowing_pickle())


def emit(record: dict[str, Any], as_json: bool) -> None:
    """Prints a result as JSON, or as aligned `key: value` lines."""
    if as_json:
        print(json.dumps(record, indent=2))
        return
    width = max(map(len, record))
    for key, value in record.items():
        print(f"{key:<{width}}  {json.dumps(value) if isinstance(value, dict | list) else value}")
