"""The `anyshape` command's Typer app and what its commands share: common options, printing results."""

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

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Hugging Face folder, .gguf file, 'smollm2-135m', or a run folder of `anyshape train`.",
        metavar="MODEL",
        show_default=False,
    ),
]
ShapeOpt = Annotated[
    str | None,
    typer.Option(
        "--shape",
        help='Sub-network as inline JSON or a JSON file, e.g. \'{"layers": [0, 2], "hidden_size": 448}\'.',
        metavar="SHAPE",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
MaxMemoryOpt = Annotated[
    str | None,
    typer.Option(
        help="Refuse to start training when the estimated peak memory of a step exceeds this (e.g. 8GiB); "
        "default: what the loaded model holds plus what is free.",
        metavar="SIZE",
        show_default=False,
    ),
]


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
