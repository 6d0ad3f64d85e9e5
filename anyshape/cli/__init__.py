"""Command-line interface: `anyshape COMMAND --help` teaches each command."""

from anyshape.cli.main import app, main

__all__ = ["app", "main"]
