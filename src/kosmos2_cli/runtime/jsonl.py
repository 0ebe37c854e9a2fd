"""The batch output file: JSON lines appended whole, read back on a rerun to skip what is done.

Each record is one `write` system call of the complete line (newline included) on a file opened for appending,
so a run that is killed leaves whole lines, and at worst a partial last line, which the next run cuts off
before appending. One run at a time: the file is locked while a run writes it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class OutputFileError(ValueError):
    """The output file cannot be used (not ours, not writable, or in use by another run)."""

    def __init__(self, message: str, advice: str | None = None) -> None:
        super().__init__(message)
        self.advice = advice  # what the caller can change, as a word the front end turns into its own terms


class ResultsFile:
    """An open JSON-lines output: `done` holds the keys of its records, `failed` those of its error records."""

    def __init__(self, path: Path, key: Callable[[dict[str, Any]], str | None], *, overwrite: bool = False,
                 retry_failed: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.path = Path(path)
        self._key = key
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.truncated = 0  # bytes of a partial last line cut off
        self.dropped = 0  # error records removed for --retry-failed
        self.written = 0
        if self.path.is_dir():
            raise OutputFileError(f"{self.path}: is a directory, not a file such as results.jsonl")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as err:
            raise OutputFileError(f"{self.path}: cannot open for writing ({err.strerror or err})") from err
        try:
            self._lock()
            if overwrite:
                os.ftruncate(self._fd, 0)
            else:
                self._read_existing()
                if retry_failed is not None:
                    self._drop_failures(retry_failed)
        except BaseException:
            os.close(self._fd)
            raise
        self._start = os.fstat(self._fd).st_size

    def appended(self) -> tuple[int, int]:
        """(records, error records) this run has written, read back from the file: exact even when an interrupt
        came between a write and the bookkeeping after it."""
        end = os.fstat(self._fd).st_size
        data = os.pread(self._fd, end - self._start, self._start)
        lines = data.splitlines()
        return len(lines), sum(b'"error"' in line and "error" in json.loads(line) for line in lines)

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock, the rest still holds
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise OutputFileError(f"{self.path}: another kosmos2 batch is writing this file") from err

    def _read_existing(self) -> None:
        good_end = 0
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                if not line.endswith(b"\n"):
                    break  # a partial last line from a killed run
                good_end += len(line)
                if not line.strip():
                    continue
                record = _parse(line)
                if record is None:
                    raise OutputFileError(f"{self.path}: line {number} is not a JSON record; not a kosmos2 output "
                                          "file?", advice="output")
                self._remember(record)
        size = os.fstat(self._fd).st_size
        if size > good_end:
            os.ftruncate(self._fd, good_end)
            self.truncated = size - good_end

    def _remember(self, record: dict[str, Any]) -> None:
        key = self._key(record)
        if key is None:
            return
        self.done.add(key)
        if "error" in record:
            self.failed.add(key)
        else:
            self.failed.discard(key)

    def _drop_failures(self, retry: Callable[[dict[str, Any]], bool]) -> None:
        """Rewrite the file without the error records `retry` picks (atomically: temp file, then rename)."""
        with open(self.path, "rb") as handle:
            lines = handle.readlines()
        kept = []
        for line in lines:
            record = _parse(line) if line.strip() else None
            if record is not None and "error" in record and retry(record):
                key = self._key(record)
                self.done.discard(key)
                self.failed.discard(key)
                self.dropped += 1
            else:
                kept.append(line)
        if not self.dropped:
            return
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        temp.write_bytes(b"".join(kept))
        os.replace(temp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        self._lock()

    def write(self, record: dict[str, Any]) -> None:
        """Append one record as one whole line, written through to the file at once."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            count = os.write(self._fd, view)
            view = view[count:]
        key = self._key(record)
        if key is not None:
            self._remember(record)
        self.written += 1

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "image" in record else None
