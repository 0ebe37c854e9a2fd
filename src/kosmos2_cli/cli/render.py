"""What the terminal shows: results as coloured text and tables (rich), JSON lines, one-line errors, progress.

Results go to stdout; errors, notes and progress to stderr, so `kosmos2 caption x.jpg --json > out.jsonl`
captures data only. Text from the model is never read as rich markup.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich import box as rich_box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from kosmos2_cli.api.results import Failure, Result
from kosmos2_cli.cli import palette


def json_line(record: dict[str, Any]) -> str:
    """One record as one line of JSON (UTF-8 kept readable), newline included."""
    return json.dumps(record, ensure_ascii=False, separators=(", ", ": ")) + "\n"


def result_renderables(result: Result) -> list[Any]:
    """The rich pieces of one result: a header, the text with phrases coloured like their boxes, a table."""
    header = Text()
    header.append(result.image, style="bold")
    header.append(f"  {result.width}×{result.height}  {result.task}", style="dim")
    parts: list[Any] = [header]
    if result.task == "ask":
        parts.append(Text.assemble(("Q: ", "dim"), (str(result.extra.get("question", "")), "italic")))
    if result.task == "refer" and result.extra.get("box_px"):
        parts.append(Text.assemble(("region ", "dim"), (_box(result.extra["box_px"]), "bold"), (" px", "dim")))
    if result.task != "ground":
        text = Text(result.text or "(no text)", style="" if result.text else "dim italic")
        for index, entity in enumerate(result.entities):
            start, end = entity.span
            if 0 <= start < end <= len(result.text):
                text.stylize(f"bold {palette.color(index)}", start, end)
        parts.append(Text.assemble(("A: ", "dim"), text) if result.task == "ask" else text)
    parts.append(entity_table(result))
    return parts


def entity_table(result: Result) -> Table | Text:
    """Entities with their pixel boxes (ground: every phrase, placed or not)."""
    table = Table(box=rich_box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold dim")
    table.add_column("", no_wrap=True)
    table.add_column("phrase")
    for name in ("x1", "y1", "x2", "y2", "score"):
        table.add_column(name, justify="right", no_wrap=True)
    rows = 0
    by_phrase = {}
    for index, entity in enumerate(result.entities):
        by_phrase.setdefault(entity.phrase, []).append((index, entity))
    if result.task == "ground":
        for phrase, placed in (result.extra.get("found") or {}).items():
            if not placed:
                table.add_row(Text("·", style="dim"), Text(phrase, style="dim"),
                              Text("not found", style="italic red"), "", "", "", "")
                rows += 1
                continue
            for index, entity in by_phrase.get(phrase, []):
                rows += _entity_rows(table, index, entity)
    else:
        for index, entity in enumerate(result.entities):
            rows += _entity_rows(table, index, entity)
    if not rows:
        return Text("no grounded phrases", style="dim italic")
    return table


def _entity_rows(table: Table, index: int, entity) -> int:
    color = palette.color(index)
    scores = entity.scores or []
    for n, box in enumerate(entity.boxes_px):
        swatch = Text("■", style=color) if n == 0 else Text("")
        phrase = Text(entity.phrase, style=f"bold {color}") if n == 0 else Text("")
        score = f"{scores[n]:.2f}" if n < len(scores) and scores[n] is not None else ""
        table.add_row(swatch, phrase, *(str(v) for v in box), score)
    return len(entity.boxes_px)


def _box(values) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def _rate(task: Task) -> float | None:
    """Images per second since the start: batches finish in bursts, so a windowed rate would jump about."""
    elapsed = task.finished_time if task.finished else task.elapsed
    return task.completed / elapsed if task.completed and elapsed else None


class RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task: Task) -> Text:
        rate = _rate(task)
        return Text("–  img/s" if rate is None else f"{rate:5.2f} img/s", style="cyan")


class EtaColumn(ProgressColumn):
    """Time left at the rate so far."""

    def render(self, task: Task) -> Text:
        rate = _rate(task)
        if task.finished or task.total is None:
            return Text("ETA 0:00:00", style="cyan")
        if not rate:
            return Text("ETA -:--:--", style="cyan")
        seconds = int((task.total - task.completed) / rate)
        return Text(f"ETA {seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}", style="cyan")


class Reporter:
    """Where a command's output goes: results (rich or JSON) to stdout; errors, notes, progress to stderr."""

    def __init__(self, json_mode: bool = False, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.out = Console(highlight=False, soft_wrap=False)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self._live_out: Console | None = None  # while a progress bar runs on the terminal
        self.printed = 0

    # -- results ------------------------------------------------------------------------------------------------

    def result(self, result: Result) -> None:
        if self.json_mode:
            self._write_json(result.to_dict())
            return
        console = self._live_out or self.out
        if self.printed:
            console.print()
        for part in result_renderables(result):
            console.print(part)
        self.printed += 1

    def failure(self, failure: Failure, record: dict[str, Any] | None = None) -> None:
        """A failed image: its record in JSON mode, and always a one-line error on stderr."""
        if self.json_mode:
            self._write_json(record or failure.to_dict())
        self.error(failure.error)

    def _write_json(self, record: dict[str, Any]) -> None:
        sys.stdout.write(json_line(record))
        sys.stdout.flush()

    # -- messages -----------------------------------------------------------------------------------------------

    def error(self, message: str) -> None:
        self.err.print(Text.assemble(("error", "bold red"), ": ", _one_line(message)))

    def warning(self, message: str) -> None:
        self.err.print(Text.assemble(("warning", "bold yellow"), ": ", _one_line(message)))

    def note(self, message: str, style: str = "dim") -> None:
        if not self.quiet:
            self.err.print(Text(_one_line(message), style=style))

    # -- progress -----------------------------------------------------------------------------------------------

    @contextmanager
    def progress(self, total: int, description: str, bar: bool = True) -> Iterator[Progress | None]:
        """A progress bar on stderr (a spinner alone when `bar` is False), or None when it would only be noise:
        --quiet, stderr not a terminal, or stdout a terminal that is not stderr's."""
        if self.quiet or not self.err.is_terminal:
            yield None
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if bar:
            columns += [BarColumn(), MofNCompleteColumn(), RateColumn(), TimeElapsedColumn(), EtaColumn()]
        else:
            columns += [TimeElapsedColumn()]
        progress = Progress(*columns, console=self.err, transient=True, redirect_stdout=False,
                            redirect_stderr=False)
        progress.add_task(description, total=total)
        with progress:
            if self.out.is_terminal and not self.json_mode:
                self._live_out = progress.console  # print results above the bar, on the same terminal
            try:
                yield progress
            finally:
                self._live_out = None


def _one_line(message: str) -> str:
    return " ".join(str(message).split())
