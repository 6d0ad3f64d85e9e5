"""Text sources: the embedded default, .txt and .jsonl files, and their errors."""

import pytest

from anyshape import DataError
from anyshape.data.text import default_text, load_text, read_text


def test_default_text_is_long_english_prose():
    text = load_text(None)
    assert text == default_text() and len(text) > 400_000 and "the" in text


def test_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("one two")
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_text(tmp_path / "a.txt") == "one two"
    assert read_text(tmp_path / "b.jsonl") == "one\n\ntwo"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "not found"),
        ("empty.txt", b"  \n", "contains no text"),
        ("latin1.txt", "café".encode("latin-1"), "not UTF-8"),
        ("bad.jsonl", b'{"text": "ok"}\n{oops\n', "line 2 is not JSON"),
        ("field.jsonl", b'{"content": "x"}\n', 'no string field "text"'),
    ],
)
def test_bad_files_say_what_is_wrong(tmp_path, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_text(tmp_path / name)


def test_wikitext_is_read_the_hugging_face_way(tmp_path):
    (tmp_path / "wiki.test.raw").write_text(" \n = Title = \n \n Body text . \n")
    from anyshape.data.text import wikitext_text

    assert wikitext_text(tmp_path / "wiki.test.raw") == "\n\n = Title = \n\n\n\n\n Body text . \n"
