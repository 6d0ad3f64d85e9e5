"""Command-line interface: `anyshape COMMAND --help` teaches each command."""

from anyshape.cli.app import app, main

__all__ = ["app", "main"]
