"""`anyshape.json`: where an exported model came from (parent, Shape, anyshape version)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anyshape.model.config import LlamaFamilyConfig
from anyshape.shape import Shape
from anyshape.version import __version__

FILENAME = "anyshape.json"


def write_provenance(
    folder: Path,
    parent: str,
    config: LlamaFamilyConfig,
    shape: Shape,
    model_type: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """Writes anyshape.json; `model_type` is the exported config's (it may differ from the
    parent's, see `export.extract.sub_config`); `extra` adds records such as how the
    parent's units were sorted."""
    record: dict[str, Any] = {
        "anyshape_version": __version__,
        "parent": parent,
        "parent_model_type": config.model_type,
        "model_type": model_type,
        "shape": shape.to_dict(),
        "parent_shape": Shape.full(config).to_dict(),
        "num_parameters": shape.num_parameters(config),
        "num_parameters_non_embedding": shape.num_parameters(config, embeddings=False),
        **(extra or {}),
    }
    (folder / FILENAME).write_text(json.dumps(record, indent=2) + "\n")


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The provenance record of an exported folder, or None if it has none."""
    path = Path(folder) / FILENAME
    return json.loads(path.read_text()) if path.is_file() else None
