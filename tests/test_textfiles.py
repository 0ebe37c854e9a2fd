"""The user's text files: one error shape for every reader, raised as the caller's own error type."""

from __future__ import annotations

import pytest

from kosmos2_cli.datasets.records import DatasetError, read_classes, read_jsonl
from kosmos2_cli.runtime.textfiles import iter_lines, listed


class Oops(ValueError):
    pass


def test_lines_keep_newlines_and_lists_skip_blanks_and_comments(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a.jpg\n\n  # a comment\n  b.png  \nc.jpg", encoding="utf-8")
    assert list(iter_lines(path, "a list", Oops)) == ["a.jpg\n", "\n", "  # a comment\n", "  b.png  \n", "c.jpg"]
    assert list(listed(path, "a list", Oops)) == ["a.jpg", "b.png", "c.jpg"]


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "cannot read the class list (No such file or directory)"),
    (lambda p: p.mkdir(), "is a directory, not the class list"),
    (lambda p: p.write_bytes(b"cat\n\xff\xfe\x00dog\n"), "not UTF-8 text, so not the class list"),
])
def test_unreadable_files_name_the_path_what_and_why(tmp_path, make, words):
    path = tmp_path / "classes.txt"
    make(path)
    with pytest.raises(Oops) as caught:
        list(listed(path, "the class list", Oops))
    assert str(caught.value).startswith(f"{path}: {words}")
    with pytest.raises(DatasetError, match="classes.txt: "):
        read_classes(path)


def test_a_partial_last_json_line_is_dropped_a_bad_middle_one_is_named(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n{"c"', encoding="utf-8")
    assert list(read_jsonl(path)) == [(1, {"a": 1}), (3, {"b": 2})]
    path.write_text('{"a": 1}\n[1]\n{"b": 2}\n', encoding="utf-8")
    with pytest.raises(DatasetError, match="line 2 is not a JSON object"):
        list(read_jsonl(path))
