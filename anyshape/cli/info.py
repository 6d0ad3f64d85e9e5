"""`anyshape info`: a model's architecture and size, read from its config (the weights' headers checked)."""

from __future__ import annotations

from anyshape.checkpoints import check_weights, load_config, resolve
from anyshape.cli.app import app, emit
from anyshape.cli.options import JsonOpt, ModelArg, ShapeOpt
from anyshape.export.provenance import read_provenance
from anyshape.shape import Shape
from anyshape.share.storage import SHARING_FILE


@app.command()
def info(model: ModelArg, shape: ShapeOpt = None, as_json: JsonOpt = False) -> None:
    """Show the architecture, parameter counts and FLOPs per token of MODEL (or of a SHAPE of it).

    For a shared model (`anyshape share`) also the parameters and bytes stored, against the
    effective parameters and the bytes of the same model as a plain checkpoint.

    \b
    Example: anyshape info smollm2-135m --json
    """
    config = load_config(model)
    check_weights(model)  # headers only: a truncated or lying file is refused here, not when used
    chosen = Shape.parse(shape, config) if shape is not None else Shape.full(config)
    path = resolve(model)
    record = {
        "model": model,
        "path": str(path),
        "model_type": config.model_type,
        "num_hidden_layers": chosen.num_hidden_layers,
        "hidden_size": chosen.hidden_size,
        "num_attention_heads": chosen.num_attention_heads,
        "num_key_value_heads": chosen.num_key_value_heads,
        "head_dim": config.head_dim,
        "intermediate_size": chosen.intermediate_size,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_word_embeddings,
        "num_parameters": chosen.num_parameters(config),
        "num_parameters_non_embedding": chosen.num_parameters(config, embeddings=False),
        "flops_per_token": chosen.flops_per_token(config),
        "shape": chosen.to_dict(),
    }
    if path.is_dir() and (provenance := read_provenance(path)) is not None:
        record["provenance"] = provenance
    if path.is_dir() and (path / SHARING_FILE).is_file():  # `anyshape share`'s compact format
        from anyshape.share.storage import storage_summary

        record.update(storage_summary(path))
    emit(record, as_json)
