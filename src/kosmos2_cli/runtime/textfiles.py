"""Reading the user's text files (lists of images, phrases, classes, JSON lines) with one kind of error message.

Every reader of a file the user named says the same thing when it cannot be read: the path, what the file was
meant to be, and why (no such file, a folder, not UTF-8), as the caller's own error type, so each layer keeps
its one-line errors without repeating the open/decode handling.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path


def iter_lines(path: Path, what: str, error: type[Exception]) -> Iterator[str]:
    """The file's lines as read (newline kept, so a caller can tell a partial last line); `error(message)` when
    it cannot be opened or decoded."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a directory, not {what}")
    try:
        handle = open(path, encoding="utf-8")
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror or err})") from err
    with handle:
        try:
            yield from handle
        except UnicodeDecodeError as err:
            raise error(f"{path}: not UTF-8 text, so not {what} ({err.reason})") from err


def listed(path: Path, what: str, error: type[Exception]) -> Iterator[str]:
    """The entries of a list file: one a line, stripped, blank lines and lines starting with # skipped."""
    for line in iter_lines(path, what, error):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            yield entry
