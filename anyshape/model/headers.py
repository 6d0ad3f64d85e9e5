"""What a weights file says about itself, checked before any tensor is read.

    safetensors   8 bytes: N, the header's length (little-endian); N bytes of JSON,
                  {name: {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [start, end]}}
                  with offsets into the data that follows; then the data
    GGUF          metadata, then one tensor info per tensor: name, dimensions (innermost first),
                  GGML type and offset into the aligned data section; then the data

A file whose header lies (a tensor of a shape the config does not imply, of a dtype anyshape does
not read, or whose data would lie past the end of the file) is refused here with the file, the
tensor and the fix, so nothing is allocated for it. `check_finite` refuses NaN or inf in what was
read after all.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from anyshape.errors import AnyshapeError, CheckpointError, first_line
from anyshape.extras import require

REREAD = "re-download or re-export it"
# safetensors dtype -> bytes per element
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what anyshape converts to its compute dtype
GGUF_INTEGER_TYPES = ("I8", "I16", "I32", "I64")  # every other GGML type dequantizes to floats
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as its file's header describes it: dtype (the format's name), shape (torch
    order, outermost first) and where its data lies."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


def safetensors_header(
    path: Path, fix: str = REREAD, error: type[AnyshapeError] = CheckpointError
) -> dict[str, TensorHeader]:
    """The tensors a safetensors file holds, read from its header alone; raises `error` if the
    header is malformed, if a tensor's byte range does not match its shape and dtype, or if
    its data would lie past the end of the file (a truncated file)."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if size < 8 or length > min(size - 8, MAX_HEADER_BYTES):
                raise error(
                    f"{path} is corrupt or truncated: its header claims {length:,} bytes but the file has "
                    f"{size:,} in all; {fix}"
                )
            raw = json.loads(file.read(length))
    except OSError as problem:
        raise error(f"cannot read {path} ({first_line(problem)}); {fix}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as problem:
        raise error(f"{path} has a corrupt safetensors header ({first_line(problem)}); {fix}") from None
    if not isinstance(raw, dict):
        raise error(f"{path} has a corrupt safetensors header (not a JSON object); {fix}")
    raw.pop("__metadata__", None)
    data_start, data_bytes = 8 + length, size - 8 - length
    tensors = {}
    for name, entry in raw.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(v, int) and v >= 0 for v in (*shape, start, end)):
                raise TypeError("negative or non-integer sizes")
        except (KeyError, TypeError, ValueError):
            raise error(f"{path}: the header entry of tensor {name} is malformed ({entry!r:.80}); {fix}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise error(f"{path}: tensor {name} has dtype {dtype!r}, which safetensors does not define; {fix}")
        needed = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if end - start != needed:
            raise error(
                f"{path}: the header is corrupt: tensor {name} of shape {list(shape)} and dtype {dtype} needs "
                f"{needed:,} bytes but its offsets give it {end - start:,}; {fix}"
            )
        if end > data_bytes:
            raise error(
                f"{path} is truncated: tensor {name} ends at byte {data_start + end:,} but the file has "
                f"{size:,} bytes; {fix}"
            )
        tensors[name] = TensorHeader(dtype, shape, data_start + start, end - start)
    return tensors


def check_tensors(
    path: Path,
    tensors: Mapping[str, TensorHeader],
    expected: Mapping[str, tuple[int, ...]] | None = None,
    dtypes: tuple[str, ...] | None = FLOAT_DTYPES,
    fix: str = REREAD,
    error: type[AnyshapeError] = CheckpointError,
) -> None:
    """Refuses a tensor whose dtype is not one of `dtypes` (None: any), or whose shape differs
    from `expected[name]` (names not in `expected` are left to the caller)."""
    for name, tensor in tensors.items():
        if dtypes is not None and tensor.dtype not in dtypes:
            raise error(
                f"{path}: tensor {name} is {tensor.dtype}, but anyshape reads only {', '.join(dtypes)} tensors "
                f"here; the file is not a float checkpoint of this model; {fix}"
            )
        if expected is not None and name in expected and tensor.shape != tuple(expected[name]):
            raise error(
                f"{path}: {name} is {tensor.shape} in the weights but {tuple(expected[name])} by config.json; "
                "the weights and config.json come from different models"
            )


def check_finite(
    path: Path, tensors: Mapping[str, torch.Tensor], fix: str = REREAD, error: type[AnyshapeError] = CheckpointError
) -> None:
    """Refuses floating tensors that hold NaN or inf, naming the first one."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = (~torch.isfinite(tensor)).sum().item()
            raise error(
                f"{path}: tensor {name} holds {bad:,} NaN or inf values of {tensor.numel():,}; the file is damaged "
                f"or was saved from a diverged run; {fix}"
            )


def gguf_header(path: Path, fix: str = REREAD) -> tuple[str, dict[str, TensorHeader]]:
    """The architecture a GGUF file names and its tensors, from its metadata and tensor infos
    alone (gguf's GGUFReader would also view every tensor's data, which fails with a bare reshape
    error on a truncated file); raises CheckpointError for a malformed header, an integer
    tensor, or data that would lie past the end of the file (a truncated file)."""
    gguf = require("gguf", "reading a .gguf model")

    try:
        with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            architecture, alignment, infos, offset = _gguf_infos(data)
            size = len(data)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as problem:
        raise CheckpointError(f"{path} has a corrupt or truncated GGUF header ({first_line(problem)}); {fix}") from None
    data_start = -(-offset // alignment) * alignment
    tensors = {}
    for name, dims, raw_type, start in infos:
        try:
            kind = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name} has the unknown GGML type {raw_type}; {fix}") from None
        if kind.name in GGUF_INTEGER_TYPES:
            raise CheckpointError(
                f"{path}: tensor {name} is {kind.name}, an integer type that no model weight uses; {fix}"
            )
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        if dims and dims[0] % block:
            raise CheckpointError(
                f"{path}: tensor {name} has rows of {dims[0]} values, not whole {kind.name} blocks of {block}; {fix}"
            )
        nbytes = math.prod(dims) // block * block_bytes
        if data_start + start + nbytes > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {data_start + start + nbytes:,} but the file has "
                f"{size:,} bytes; {fix}"
            )
        tensors[name] = TensorHeader(kind.name, tuple(reversed(dims)), data_start + start, nbytes)
    return architecture, tensors


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_infos(data: mmap.mmap) -> tuple[str, int, list[tuple[str, list[int], int, int]], int]:
    """(architecture, alignment, [(name, dims innermost first, GGML type, offset)], end of the
    tensor infos) of a little-endian GGUF file of version 2 or 3."""
    magic, version, tensor_count, kv_count = struct.unpack_from("<4sIQQ", data, 0)
    if magic != b"GGUF":
        raise ValueError(f"it starts with {magic!r}, not GGUF")
    if version not in (2, 3):
        raise ValueError(f"version {version}; anyshape reads GGUF versions 2 and 3")
    offset = 24

    def string() -> str:
        nonlocal offset
        (length,) = struct.unpack_from("<Q", data, offset)
        if offset + 8 + length > len(data):
            raise ValueError(f"a string of {length:,} bytes at byte {offset:,} runs past the end")
        offset += 8 + length
        return data[offset - length : offset].decode("utf-8")

    def value(kind: int) -> object:
        nonlocal offset
        if kind == _GGUF_STRING:
            return string()
        if kind == _GGUF_ARRAY:
            item, count = struct.unpack_from("<IQ", data, offset)
            offset += 12
            if item in _GGUF_SCALARS:  # skipped, not read: vocabularies are long
                offset += count * struct.calcsize(_GGUF_SCALARS[item])
            elif count > len(data) - offset:
                raise ValueError(f"an array of {count:,} items at byte {offset:,} runs past the end")
            else:
                for _ in range(count):
                    value(item)
            return None
        if kind not in _GGUF_SCALARS:
            raise ValueError(f"unknown value type {kind} at byte {offset:,}")
        (result,) = struct.unpack_from("<" + _GGUF_SCALARS[kind], data, offset)
        offset += struct.calcsize(_GGUF_SCALARS[kind])
        return result

    metadata = {}
    for _ in range(kv_count):
        key = string()
        (kind,) = struct.unpack_from("<I", data, offset)
        offset += 4
        metadata[key] = value(kind)
    infos = []
    for _ in range(tensor_count):
        name = string()
        (n_dims,) = struct.unpack_from("<I", data, offset)
        dims = list(struct.unpack_from(f"<{n_dims}Q", data, offset + 4))
        kind, start = struct.unpack_from("<IQ", data, offset + 4 + 8 * n_dims)
        offset += 4 + 8 * n_dims + 12
        infos.append((name, dims, kind, start))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"general.alignment {alignment!r} is not a power of two")
    return str(metadata.get("general.architecture")), alignment, infos, offset


def gguf_names(architecture: str, num_layers: int, hf_names: list[str]) -> dict[str, str]:
    """GGUF name -> HF name of the given HF state-dict names (those llama.cpp has a name for)."""
    gguf = require("gguf", "reading a .gguf model")

    arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}.get(architecture)
    if arch is None:
        return {}
    names = gguf.get_tensor_name_map(arch, num_layers)
    mapped = {hf: names.get_name(hf, try_suffixes=(".weight", ".bias")) for hf in hf_names}
    return {name: hf for hf, name in mapped.items() if name is not None}
