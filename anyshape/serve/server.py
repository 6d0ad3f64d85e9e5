"""`anyshape serve` put together: a model loaded once, its catalog, the engine's thread, and
the API under uvicorn.

On Ctrl-C or SIGTERM the engine first refuses new requests (503), uvicorn stops listening, the
requests in flight finish, and then the engine's thread stops.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import uvicorn

from anyshape.checkpoints import load, load_tokenizer
from anyshape.serve.api import create_app
from anyshape.serve.catalog import Catalog, catalog_of
from anyshape.serve.engine import Engine


class Server(uvicorn.Server):
    """uvicorn's server of the API over `engine` and `catalog`, whose engine refuses new
    requests as soon as it is told to exit."""

    def __init__(self, config: uvicorn.Config, engine: Engine, catalog: Catalog):
        super().__init__(config)
        self.engine, self.catalog = engine, catalog

    @property
    def address(self) -> str:
        """http://host:port it listens on, once started (the port chosen where it was 0)."""
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(f"anyshape: listening on {self.address} (Ctrl-C stops)", file=sys.stderr, flush=True)

    def handle_exit(self, sig: int, frame) -> None:
        self.engine.refuse_new()
        super().handle_exit(sig, frame)


def build_server(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "anyshape",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    max_batch: int = 8,
    max_waiting: int = 64,
    max_tokens: int = 1024,
    on_catalog: Callable[[Catalog], None] | None = None,
) -> Server:
    """A server of `model` (any model reference `anyshape.load` reads), not yet running:
    `server.run()` serves until Ctrl-C; port 0 takes a free port."""
    weights = load(model, dtype=dtype).to(device).eval()
    catalog = catalog_of(Path(model), weights, name)
    if on_catalog is not None:
        on_catalog(catalog)
    engine = Engine(weights, max_batch, max_waiting).start()
    app = create_app(catalog, load_tokenizer(model), engine, max_tokens)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=None)
    return Server(config, engine, catalog)
