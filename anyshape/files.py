"""Atomic writes: an interrupted write never leaves something that looks complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from anyshape.errors import AnyshapeError


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a hidden temporary folder beside `out`; on success it is renamed to `out`.

    On any exception (Ctrl-C included) the temporary folder is removed and `out` is untouched.
    An existing `out` is replaced only with `overwrite=True`.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise AnyshapeError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise AnyshapeError(f"{out} exists and is not a folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make the finished folder private
    try:
        yield tmp
        publish_directory(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish_directory(finished: Path, out: Path) -> None:
    """Renames the complete folder `finished` to `out`; an existing `out` is replaced only at
    this last step (moved aside, then deleted), so `out` is always a complete folder or absent."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(finished, out)
        shutil.rmtree(trash)
    else:
        os.replace(finished, out)
