"""Atomic writes: an interrupted write never leaves something that looks complete, and a full
disk leaves the previous output as it was and says so in one line."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from anyshape.errors import AnyshapeError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # what a full disk or an exhausted quota raises


@contextmanager
def atomic_directory(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a hidden temporary folder beside `out`; on success it is renamed to `out`.

    On any exception (Ctrl-C included) the temporary folder is removed and `out` is untouched.
    An existing `out` is replaced only with `overwrite=True`.
    """
    out = Path(out)
    clear_leftovers(out)
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
    except OSError as error:
        if error.errno in DISK_FULL:
            raise disk_full(error, out) from None
        raise
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


def clear_leftovers(out: Path) -> None:
    """Tidies what a writer of `out` killed mid-way (SIGKILL, power loss) left beside it: puts
    back the previous `out` if a replacement had moved it aside (`.NAME.old-*`, see
    `publish_directory`) but not yet renamed its own folder in, then removes the old and the
    half-written (`.NAME.partial-*`) temporary folders."""
    old = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda folder: folder.stat().st_mtime_ns)
    moved_aside = [folder / out.name for folder in old if (folder / out.name).is_dir()]
    if moved_aside and not out.exists():
        os.replace(moved_aside[-1], out)
    for folder in old + list(out.parent.glob(f".{out.name}.partial-*")):
        shutil.rmtree(folder, ignore_errors=True)


def disk_full(error: OSError, out: Path) -> AnyshapeError:
    """The one-line message of a write to `out` that failed for want of disk space (or quota)."""
    return AnyshapeError(
        f"no space left on the disk of {out.parent} while writing {out.name} ({os.strerror(error.errno)}); "
        f"free some space and run again (the previous {out.name}, if any, is intact)"
    )


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
    except OSError as error:
        if error.errno in DISK_FULL:
            raise disk_full(error, paths[0]) from None
        raise
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
