"""`anyshape export`: write one Shape of a model as a GGUF file (llama.cpp) or a Hugging Face folder."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from anyshape.checkpoints import load, load_config, load_tokenizer
from anyshape.cli.app import app, emit
from anyshape.cli.extract import check_out
from anyshape.cli.options import ForceOpt, JsonOpt, ModelArg, OverwriteOpt, ShapeOpt, out_option, overwriting
from anyshape.export.hf import export_hf
from anyshape.extras import require
from anyshape.shape import Shape

FORMATS = ("gguf", "hf")
HF_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # --format hf: --outtype -> torch dtype


@app.command()
def export(
    model: ModelArg,
    out: out_option("Output: a .gguf file (--format gguf) or a folder (--format hf).", metavar="OUT"),
    shape: ShapeOpt = None,
    fmt: Annotated[
        str, typer.Option("--format", help="gguf (llama.cpp) or hf (Hugging Face folder).", metavar="FORMAT")
    ] = "gguf",
    outtype: Annotated[
        str, typer.Option(help="Weight type: f32, f16, bf16, or q8_0 (gguf only); norms stay f32.", metavar="OUTTYPE")
    ] = "f16",
    overwrite: OverwriteOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export SHAPE of MODEL (default: all of it) to OUT, written atomically.

    --format gguf writes one file that llama.cpp runs (architecture llama, or qwen2 for Qwen2),
    with the tokenizer and anyshape.* provenance metadata. --format hf writes what
    `anyshape extract` writes.

    \b
    Example: anyshape export smollm2-135m --shape '{"num_hidden_layers": 20}' --outtype q8_0 --out small.gguf
    """
    import torch

    overwrite = overwriting(overwrite, force)
    if fmt not in FORMATS:
        raise typer.BadParameter(f"{fmt!r} is not one of {', '.join(FORMATS)}", param_hint="--format")
    outtypes = HF_DTYPES
    if fmt == "gguf":
        gguf = require("gguf", "anyshape export --format gguf")
        from anyshape.export.gguf import OUTTYPES as outtypes
        from anyshape.export.gguf import export_gguf
    if outtype not in outtypes:
        raise typer.BadParameter(
            f"{outtype!r} is not one of {', '.join(outtypes)} (for --format {fmt})", param_hint="--outtype"
        )
    _check_target(out, fmt, overwrite)  # everything that can fail fast does so before the slow load
    config = load_config(model)
    chosen = Shape.parse(shape, config) if shape is not None else Shape.full(config)
    tokenizer = load_tokenizer(model)
    if fmt == "gguf":
        export_gguf(load(model), chosen, out, tokenizer, outtype=outtype, parent=model, overwrite=overwrite)
    else:
        elastic = load(model, dtype=getattr(torch, HF_DTYPES[outtype]))
        export_hf(elastic, chosen, out, tokenizer=tokenizer, parent=model, overwrite=overwrite)
    record = {
        "out": str(out),
        "format": fmt,
        "outtype": outtype,
        "shape": chosen.to_dict(),
        "num_parameters": chosen.num_parameters(config),
        "num_parameters_non_embedding": chosen.num_parameters(config, embeddings=False),
    }
    if fmt == "gguf":
        record["bytes"] = out.stat().st_size
        types = Counter(tensor.tensor_type.name.lower() for tensor in gguf.GGUFReader(out).tensors)
        record["tensor_types"] = dict(sorted(types.items()))
        if outtype == "q8_0" and "f16" in types:
            print(
                f"note: {types['f16']} matrices are stored as f16, not q8_0: their rows are not whole 32-value "
                "blocks (Shapes whose hidden and MLP sizes are multiples of 32 quantise fully: search and "
                "compress choose such sizes with --align 32)",
                file=sys.stderr,
            )
    emit(record, as_json)


def _check_target(out: Path, fmt: str, overwrite: bool) -> None:
    """Raises BadParameter unless OUT can be written: of the format's kind (a .gguf file or a
    folder), absent (or replaced with --overwrite), under a writable folder."""
    if fmt == "gguf" and out.suffix != ".gguf":
        raise typer.BadParameter(
            f"{out}: a GGUF file's name must end in .gguf, e.g. {out.with_suffix('.gguf')}", param_hint="--out"
        )
    if fmt == "gguf" and out.is_dir():
        raise typer.BadParameter(
            f"{out} is a folder; --format gguf writes one file, e.g. --out {out / 'model.gguf'}", param_hint="--out"
        )
    if out.exists() and not overwrite:
        raise typer.BadParameter(f"{out} already exists; choose another --out or pass --overwrite", param_hint="--out")
    if fmt == "hf" or not out.exists():
        check_out(out, overwrite=True)  # extract's checks: a folder if anything, under a writable folder
