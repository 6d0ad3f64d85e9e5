"""Atomic writes: an interrupted write never leaves something that looks complete, and a full
disk leaves the previous output as it was (`atomic_directory` and `atomic_files`, which write
what a command was asked for, also say so in one line).

A file is written under a hidden temporary name beside it, `.STEM.partial-*SUFFIX`, and renamed
onto its path once complete. The names are unique, so processes that write the same file at
once each rename a complete file in, the last one winning."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

from anyshape.errors import AnyshapeError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # what a full disk or an exhausted quota raises
LOW_SPACE = 1 << 20  # bytes free below which a failed torch.save is put down to a full disk


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
    except Exception as error:  # the libraries raise their own (safetensors, torch.save)
        if is_disk_full(error, out):
            raise disk_full(out) from None
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


def is_disk_full(error: Exception, out: Path) -> bool:
    """Whether `error`, raised while writing `out`, came from a full disk (or quota): an OSError
    with ENOSPC or EDQUOT, an error that quotes one (safetensors: "No space left on device (os
    error 28)"), or torch.save's RuntimeError ("unexpected pos", no errno) with under 1 MiB free."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        return True
    if any(os.strerror(code) in str(error) for code in DISK_FULL):
        return True
    try:
        return isinstance(error, RuntimeError) and shutil.disk_usage(out.parent).free < LOW_SPACE
    except OSError:
        return False


def disk_full(out: Path) -> AnyshapeError:
    """The one-line message of a write to `out` that failed for want of disk space (or quota)."""
    return AnyshapeError(
        f"no space left on the disk while writing {out}; free some space on it and run again (the previous "
        f"{out.name}, if any, is intact)"
    )


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a uniquely named hidden temporary path beside `path` (same suffix) for the caller
    to write; on success it is renamed onto `path`, replacing what was there.

    On any exception (Ctrl-C included) the temporary file is removed and `path` is untouched:
    absent, or its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.stem}.partial-", suffix=path.suffix, dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        yield temporary
        temporary.chmod(0o644)  # mkstemp's 0600 would make the finished file private
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_file_leftovers(folder: Path) -> None:
    """Removes the temporaries that writers killed mid-write (SIGKILL, power loss) left in
    `folder` (`.NAME.partial-*` files of `atomic_file`). Only for a folder that one process
    writes: another process's temporary may be a write still under way."""
    for temporary in folder.glob(".*.partial-*"):
        if temporary.is_file():
            temporary.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Writes `text` to `path` through `atomic_file`."""
    with atomic_file(path) as temporary:
        temporary.write_text(text)


@contextmanager
def atomic_files(paths: Sequence[str | Path], overwrite: bool = False) -> Iterator[list[Path]]:
    """Yields an `atomic_file` temporary path for each of `paths`, for the caller to write; once
    all are written, each is renamed onto its path.

    On any exception (Ctrl-C included) the temporary files are removed and `paths` are untouched,
    so no file of the set is ever half-written. Existing files are replaced only with
    `overwrite=True`.
    """
    paths = [Path(path) for path in paths]
    existing = [path for path in paths if path.exists()]
    if existing and not overwrite:
        raise AnyshapeError(f"{existing[0]} already exists; choose another path or pass overwrite=True")
    try:
        with ExitStack() as stack:
            yield [stack.enter_context(atomic_file(path)) for path in paths]
    except Exception as error:  # the libraries raise their own (safetensors, torch.save)
        if is_disk_full(error, paths[0]):
            raise disk_full(paths[0]) from None
        raise
