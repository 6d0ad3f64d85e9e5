"""Resumable stages: each stage's output is kept with a hash of everything it was made from.

A stage is *done* when its key file holds the hash of its current inputs; the key file is
written only after the stage's output is complete, so a stage killed half-way is redone, and a
stage whose inputs changed (model, data, options, an upstream stage) is redone too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from anyshape.checkpoints import resolve
from anyshape.files import atomic_write_text, remove_file_leftovers


def input_hash(**inputs: Any) -> str:
    """A short, stable hash of JSON-serialisable inputs."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_identity(ref: str) -> dict[str, Any]:
    """What identifies a model's weights without reading them: its path, and the size and
    modification time of its config and weight files."""
    path = resolve(ref)
    files = [path] if path.is_file() else sorted([path / "config.json", *path.glob("*.safetensors")])
    return {"ref": ref, "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]}


def write_json(path: Path, record: Any) -> None:
    """Writes JSON atomically (a temporary file renamed over `path`)."""
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


class StageCache:
    """The finished stages of a run, kept in `folder` as `<stage>.key` files beside their outputs."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        remove_file_leftovers(folder)  # a stage killed mid-write is redone: its temporary goes

    def path(self, stage: str, suffix: str = ".json") -> Path:
        return self.folder / f"{stage}{suffix}"

    def done(self, stage: str, key: str) -> bool:
        key_file = self.path(stage, ".key")
        return key_file.is_file() and key_file.read_text() == key

    def finish(self, stage: str, key: str) -> None:
        """Marks `stage` done with `key`; call only after its output is completely written."""
        atomic_write_text(self.path(stage, ".key"), key)

    def read(self, stage: str) -> Any:
        return json.loads(self.path(stage).read_text())

    def save(self, stage: str, key: str, record: Any) -> Any:
        """Writes a JSON stage output and marks the stage done; returns the record."""
        write_json(self.path(stage), record)
        self.finish(stage, key)
        return record
