"""`anyshape serve`: an OpenAI-compatible server that answers each request at the size it asks for."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from anyshape.cli.app import app
from anyshape.cli.options import ModelArg
from anyshape.extras import require

DTYPES = ("float32", "bfloat16", "float16")


@app.command()
def serve(
    model: ModelArg,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port, printed).", min=0, max=65535)] = 8000,
    name: Annotated[str, typer.Option(help="The model's name in the API; its sizes are NAME@BUDGET.")] = "anyshape",
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1, ... Default: cuda if there is one.", show_default=False)
    ] = None,
    dtype: Annotated[str, typer.Option(help="Weight dtype: float32, bfloat16 or float16.")] = "float32",
    max_batch: Annotated[int, typer.Option(help="Requests of one size decoded together at most.", min=1)] = 8,
    max_waiting: Annotated[
        int, typer.Option(help="Requests queued beyond those at most; more get 429 with Retry-After.", min=0)
    ] = 64,
    max_tokens: Annotated[int, typer.Option(help="The most tokens one request may generate.", min=1)] = 1024,
) -> None:
    """Serve MODEL over HTTP with OpenAI's API (/v1/models, /v1/completions,
    /v1/chat/completions, streaming by server-sent events), plus /health and /metrics
    (Prometheus). One copy of the weights answers every size: a request names a size
    (NAME@0.5), or gives "budget": 0.37 or "max_latency_ms": 20, and "degrade": true lets a
    smaller size answer while its own is busy.

    MODEL may be a compress family's elastic/ model (its members by name, any budget found by
    the family's search on its weights, about a minute the first time on a CPU), a run of
    `anyshape train --router` (any budget, by its router), or any other model (its own size).
    Ctrl-C finishes the requests in flight, then stops.

    \b
    Examples:
      anyshape serve family/elastic --port 8000
      curl localhost:8000/v1/models
      curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "anyshape@0.5", "prompt": "The capital of France is", "max_tokens": 16}'
    """
    if dtype not in DTYPES:
        raise typer.BadParameter(f"{dtype!r} is not one of {', '.join(DTYPES)}", param_hint="--dtype")
    if "@" in name or not name.strip():
        raise typer.BadParameter(f"{name!r} must be non-empty and without '@'", param_hint="--name")
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        require(module, "anyshape serve")
    import torch

    from anyshape.serve.server import build_server

    chosen = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def announce(catalog) -> None:
        sizes = ", ".join(f"{size.name} ({size.decode_ms:.1f} ms/token)" for size in catalog.sizes)
        print(f"anyshape: serving {model} as {catalog.name}: {sizes}", file=sys.stderr)

    server = build_server(
        model, host, port, name, chosen, getattr(torch, dtype), max_batch, max_waiting, max_tokens, announce
    )
    server.run()
