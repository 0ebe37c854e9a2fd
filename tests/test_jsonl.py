"""The batch output file: whole lines, resume from what is there, partial last lines cut off, one writer."""

from __future__ import annotations

import json

import pytest

from kosmos2_cli.api.tasks import record_key
from kosmos2_cli.runtime.jsonl import OutputFileError, ResultsFile


def _record(image: str, error: bool = False) -> dict:
    record = {"image": image, "task": "caption", "detailed": False}
    return {**record, "error": "bad"} if error else {**record, "text": "An image of a cat."}


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_new_file_then_resume(tmp_path):
    path = tmp_path / "deep" / "out.jsonl"
    with ResultsFile(path, record_key) as out:
        assert out.done == set()
        out.write(_record("a.png"))
        out.write(_record("b.png", error=True))
    assert path.read_bytes().count(b"\n") == 2
    with ResultsFile(path, record_key) as out:
        assert out.done == {record_key(_record("a.png")), record_key(_record("b.png"))}
        assert out.failed == {record_key(_record("b.png"))}
        out.write(_record("c.png"))
    assert [r["image"] for r in _lines(path)] == ["a.png", "b.png", "c.png"]


def test_partial_last_line_is_cut_off(tmp_path):
    path = tmp_path / "out.jsonl"
    whole = json.dumps(_record("a.png")) + "\n"
    path.write_text(whole + json.dumps(_record("b.png"))[:25])
    with ResultsFile(path, record_key) as out:
        assert out.truncated == 25
        assert out.done == {record_key(_record("a.png"))}
        out.write(_record("b.png"))
    assert [r["image"] for r in _lines(path)] == ["a.png", "b.png"]


def test_a_foreign_file_is_not_appended_to(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes\nmore\n")
    with pytest.raises(OutputFileError, match="line 1 is not a JSON record"):
        ResultsFile(path, record_key)
    assert path.read_text() == "my notes\nmore\n"
    with ResultsFile(path, record_key, overwrite=True) as out:
        assert out.done == set()
    assert path.read_text() == ""


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(OutputFileError, match="is a directory"):
        ResultsFile(tmp_path, record_key)


def test_one_writer_at_a_time(tmp_path):
    path = tmp_path / "out.jsonl"
    with ResultsFile(path, record_key):
        with pytest.raises(OutputFileError, match="another kosmos2 batch"):
            ResultsFile(path, record_key)


def test_retry_failed_drops_error_records(tmp_path):
    path = tmp_path / "out.jsonl"
    with ResultsFile(path, record_key) as out:
        for record in (_record("a.png"), _record("b.png", error=True), _record("c.png", error=True)):
            out.write(record)
    with ResultsFile(path, record_key, retry_failed=lambda r: r["image"] == "b.png") as out:
        assert out.dropped == 1
        assert record_key(_record("b.png")) not in out.done
        assert out.failed == {record_key(_record("c.png"))}
        out.write(_record("b.png"))
    assert [(r["image"], "error" in r) for r in _lines(path)] == [("a.png", False), ("c.png", True),
                                                                  ("b.png", False)]
