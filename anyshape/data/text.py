"""Plain text for perplexity and calibration: a user's file, or the embedded default.

The embedded default is English prose shipped with CPython itself (`pydoc_data.topics`, the
language reference's topic pages), so it exists on every machine with no download.
"""

from __future__ import annotations

import json
from pathlib import Path

from anyshape.errors import DataError

DEFAULT_TEXT_NAME = "pydoc_data.topics"


def default_text() -> str:
    """About 465,000 characters of the Python language reference, topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text(path: str | Path) -> str:
    """The text of a `.txt` file, or of a `.jsonl` file's "text" fields joined by blank lines."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} not found; pass a .txt or .jsonl file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None
    if path.suffix == ".jsonl":
        raw = "\n\n".join(jsonl_texts(path, raw))
    if not raw.strip():
        raise DataError(f"{path} contains no text")
    return raw


def wikitext_text(path: str | Path) -> str:
    """A WikiText `.raw` split read the Hugging Face way: its lines (blank ones emptied) joined
    by blank lines, as `"\n\n".join(load_dataset("wikitext", ...)["text"])` gives."""
    lines = read_text(path).splitlines(keepends=True)
    return "\n\n".join(line if line.strip() else "" for line in lines)


def load_text(path: str | Path | None) -> str:
    """`path`'s text, or the embedded default when `path` is None."""
    return default_text() if path is None else read_text(path)


def jsonl_texts(path: Path, raw: str) -> list[str]:
    """The "text" fields of a JSON-lines file's records (raw: its contents), in order."""
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f'{path} line {number} has no string field "text"; write {{"text": "..."}}')
        texts.append(record["text"])
    return texts
