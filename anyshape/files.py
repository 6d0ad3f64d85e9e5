"""Atomic writes: an interrupted write never leaves something that looks complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
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


@contextmanager
def atomic_files(paths: Sequence[str | Path], overwrite: bool = False) -> Iterator[list[Path]]:
    """Yields a hidden temporary path beside each of `paths` (same suffix) for the caller to
    write; once all are written, each is renamed to its path.

    On any exception (Ctrl-C included) the temporary files are removed and `paths` are untouched,
    so no file of the set is ever half-written. Existing files are replaced only with
    `overwrite=True`.
    """
    paths = [Path(path) for path in paths]
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        raise AnyshapeError(f"{existing[0]} already exists; choose another path or pass overwrite=True")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmps = [path.with_name(f".{path.stem}.partial{path.suffix}") for path in paths]
    try:
        yield tmps
        for tmp, path in zip(tmps, paths, strict=True):
            os.replace(tmp, path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
