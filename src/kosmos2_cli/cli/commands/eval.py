"""`kosmos2 eval`: phrase grounding accuracy on an annotation file, as the paper reports it (DESIGN §10)."""

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from kosmos2_cli.cli.common import exit_with
from kosmos2_cli.cli.errors import CliError, ExitCode
from kosmos2_cli.cli.options import Settings, with_options


@with_options(exclude=("draw", "annotate_dir"))
def eval(  # noqa: A001  (the command's name)
    annotations: Annotated[Path, typer.Argument(metavar="ANNOTATIONS.jsonl", show_default=False,
                                                help="One item a line: {\"image\": PATH, \"phrase\": TEXT, "
                                                     "\"boxes\": [\\[x1, y1, x2, y2], ...]} (pixels; optional "
                                                     "\"split\"); kosmos2 convert writes them.")],
    images: Annotated[Path | None, typer.Option("--images", metavar="DIR", file_okay=False,
                                                help="Folder the items' relative image paths are under "
                                                     "(default: the current folder).")] = None,
    iou: Annotated[float, typer.Option("--iou", metavar="T", min=0.0, max=1.0,
                                       help="A prediction is correct when its IoU with a listed box is at least "
                                            "T.")] = 0.5,
    predictions: Annotated[Path | None, typer.Option("--predictions", metavar="OUT.jsonl", dir_okay=False,
                                                     help="Keep each item's prediction here; rerun the same "
                                                          "command to resume an interrupted evaluation.")] = None,
    settings: Settings = None,
) -> None:
    """Ground each item's phrase and score the first box against the listed ones: accuracy, found, mean IoU.

    Each image is encoded once for all its phrases. With --json, one object is printed: accuracy, n, found,
    mean_iou and the same per split. Mean IoU counts a phrase the model did not place as 0.

    Example: kosmos2 eval refcoco_val.jsonl --images coco/train2014 --predictions refcoco_val.pred.jsonl
    """
    exit_with(lambda: run_eval(annotations, images, iou, predictions, settings))


def run_eval(annotations: Path, images: Path | None, threshold: float, predictions: Path | None,
             settings: Settings) -> ExitCode:
    from kosmos2_cli.cli.render import Reporter
    from kosmos2_cli.datasets import evaluate
    from kosmos2_cli.datasets.records import DatasetError
    from kosmos2_cli.runtime.jsonl import OutputFileError, ResultsFile

    reporter = Reporter(quiet=settings.quiet)
    for warning in settings.check():
        reporter.warning(warning)
    try:
        items = evaluate.read_annotations(annotations)
    except DatasetError as err:
        raise CliError(str(err)) from err
    if images is not None and not images.is_dir():
        raise CliError(f"--images {images}: no such folder")
    memory: list[dict] = []
    try:
        results = ResultsFile(predictions, evaluate.item_key) if predictions is not None else None
    except OutputFileError as err:
        raise CliError.of(err) from err
    interrupted = False
    start = time.perf_counter()
    try:
        done = results.done if results is not None else set()
        todo = [item for item in items if evaluate.key_of(item) not in done]
        if results is not None and len(todo) < len(items) and todo:
            reporter.note(f"resuming: {len(items) - len(todo)} of {len(items)} items are already in {predictions}")
        if todo:
            interrupted = _run(todo, images, settings, reporter, results.write if results else memory.append)
    finally:
        if results is not None:
            results.close()
    seconds = time.perf_counter() - start
    try:
        records = evaluate.read_records(predictions) if predictions is not None else {
            evaluate.item_key(r): r for r in memory}
    except DatasetError as err:
        raise CliError(str(err)) from err
    scores = evaluate.score(items, records, threshold)
    total = scores[evaluate.ALL]
    if settings.json:
        splits = {name: s.to_dict() for name, s in scores.items() if name != evaluate.ALL}
        sys.stdout.write(json.dumps({**total.to_dict(), "iou": threshold, "splits": splits,
                                     "seconds": round(seconds, 3)}) + "\n")
    else:
        _table(scores, threshold, reporter)
    if interrupted:
        reporter.error(f"interrupted: {len(items) - total.missing} of {len(items)} items scored"
                       + (f"; run the same command again to finish ({predictions} keeps them)" if predictions
                          else "; pass --predictions to keep the predictions and resume"))
        return ExitCode.INTERRUPTED
    if total.failed:
        reporter.error(f"{total.failed} item(s) not scored: their images could not be read"
                       + (f" (jq 'select(.error)' {predictions})" if predictions else ""))
        return ExitCode.FAILED
    return ExitCode.OK


def _run(todo, images, settings: Settings, reporter, write) -> bool:
    """Ground the items still to do; True when Ctrl-C or SIGTERM stopped it."""
    from kosmos2_cli.cli.commands.batch import _sigterm_as_interrupt
    from kosmos2_cli.cli.session import open_engine
    from kosmos2_cli.datasets.evaluate import run_items
    from kosmos2_cli.datasets.records import DatasetError
    from kosmos2_cli.runtime.engine import ModelLoadError

    engine = open_engine(settings, reporter)
    try:
        with _sigterm_as_interrupt(), reporter.progress(len(todo), "eval") as progress:
            advance = (lambda n: progress.advance(progress.task_ids[0], n)) if progress is not None else None
            run_items(todo, images, engine, write, batch_size=settings.batch_size or None,
                      workers=settings.workers or None, notice=reporter.warning, advance=advance)
    except ModelLoadError as err:
        raise CliError.of(err, ExitCode.MODEL) from err
    except DatasetError as err:
        raise CliError(str(err)) from err
    except KeyboardInterrupt:
        return True
    return False


def _table(scores, threshold: float, reporter) -> None:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title=f"grounding accuracy (IoU ≥ {threshold:g})", title_justify="left")
    for name, justify in (("split", "left"), ("n", "right"), ("found", "right"), ("correct", "right"),
                          ("accuracy", "right"), ("mean IoU", "right"), ("failed", "right")):
        table.add_column(name, justify=justify)
    for name, s in sorted(scores.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        table.add_row(name, str(s.n), str(s.found), str(s.correct), f"{100 * s.accuracy:.1f}%", f"{s.mean_iou:.3f}",
                      str(s.failed), style="bold" if name == "all" else None)
    reporter.out.print(table)
