"""`kosmos2 batch`: one task over many images into a JSON-lines file that survives interruption (DESIGN §6).

Every finished image is one line, written whole at once. A rerun of the same command skips the images whose
records are in the file (same path as given, task and task arguments), so an interrupted run is completed by
running it again; an image's error record counts as done unless --retry-failed.
"""

import json
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from kosmos2_cli.api.results import Failure
from kosmos2_cli.api.tasks import TaskSpec, record_key, spec_key
from kosmos2_cli.cli.common import exit_with, task_spec
from kosmos2_cli.cli.errors import CliError, ExitCode
from kosmos2_cli.cli.options import Settings, with_options
from kosmos2_cli.cli.render import Reporter
from kosmos2_cli.fast.marks import mark
from kosmos2_cli.runtime.textfiles import listed


class Task(str, Enum):
    caption = "caption"
    ground = "ground"
    refer = "refer"
    ask = "ask"


PANEL = "Task"
RAY = "Ray"


@with_options(exclude=("draw",))
def batch(
    inputs: Annotated[list[str], typer.Argument(metavar="INPUT", show_default=False,
                                                help="Image files, folders (searched recursively) or globs.")],
    output: Annotated[Path, typer.Option("--output", "-o", metavar="OUT.jsonl", dir_okay=False, show_default=False,
                                         help="The JSON-lines file: created, or completed when it exists.")],
    task: Annotated[Task, typer.Option("--task", "-t", rich_help_panel=PANEL,
                                       help="What to do with each image.")] = Task.caption,
    detailed: Annotated[bool, typer.Option("--detailed", "-d", rich_help_panel=PANEL,
                                           help="caption: detailed descriptions.")] = False,
    phrase: Annotated[list[str], typer.Option("--phrase", "-p", metavar="TEXT", rich_help_panel=PANEL,
                                              show_default=False, help="ground: a phrase to find; repeat for "
                                                                       "several.")] = [],  # noqa: B006
    phrases_file: Annotated[Path | None, typer.Option("--phrases-file", metavar="FILE", dir_okay=False,
                                                      rich_help_panel=PANEL,
                                                      help="ground: phrases to find, one a line (e.g. the "
                                                           "classes to auto-label); with --phrase too.")] = None,
    box: Annotated[str | None, typer.Option("--box", metavar="X1,Y1,X2,Y2", rich_help_panel=PANEL,
                                            help="refer: the region (pixels, or 0..1 with --normalized).")] = None,
    normalized: Annotated[bool, typer.Option("--normalized", rich_help_panel=PANEL,
                                             help="refer: --box is in 0..1.")] = False,
    question: Annotated[str | None, typer.Option("--question", metavar="TEXT", rich_help_panel=PANEL,
                                                 help="ask: the question.")] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Retry the images whose earlier records "
                                                                      "are errors (their records are "
                                                                      "replaced).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start OUT.jsonl afresh instead of resuming "
                                                                "it.")] = False,
    ray: Annotated[bool, typer.Option("--ray", rich_help_panel=RAY,
                                      help="Run on a Ray cluster: --ray-address's, RAY_ADDRESS's, one running on "
                                           "this machine, or else a new local one over its GPUs. INPUT may then "
                                           "also be a .txt list of paths or a URI (s3://, gs://, file://).")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", metavar="auto|local|ADDRESS",
                                                    rich_help_panel=RAY, show_default=False,
                                                    help="The cluster (implies --ray): auto (a running one), local "
                                                         "(a new one here) or HOST:PORT.")] = None,
    ray_actors: Annotated[int, typer.Option("--ray-actors", metavar="N", min=0, rich_help_panel=RAY,
                                            help="--ray: model actors (0: one per GPU of the cluster, or 1 on "
                                                 "CPUs).")] = 0,
    settings: Settings = None,
) -> None:
    """Run one task over many images into a JSON-lines file, one line per image.

    Each line is written whole as soon as its image is done; run the same command again after an interruption
    and it resumes, skipping the images already in the file. Images that cannot be read get an error record
    and the run goes on; the exit status is then 1. With --json, a summary object is printed on stdout.

    Example: kosmos2 batch photos/ -o captions.jsonl          (--task caption is the default)
    """
    name = task.value
    unused = [flag for flag, value, owner in (("--detailed", detailed, "caption"), ("--phrase", phrase, "ground"),
                                              ("--phrases-file", phrases_file, "ground"),
                                              ("--box", box, "refer"), ("--normalized", normalized, "refer"),
                                              ("--question", question, "ask")) if value and owner != name]
    if unused:
        raise CliError(f"{', '.join(unused)} do(es) not apply to --task {name}")
    if phrases_file is not None:
        phrase = [*phrase, *read_phrases(phrases_file)]
    spec = task_spec(name, detailed=detailed, phrases=phrase, box=box, normalized=normalized, question=question)
    if retry_failed and overwrite:
        raise CliError("--retry-failed and --overwrite do not go together")
    if ray or ray_address is not None:
        exit_with(lambda: run_ray_batch(spec, inputs, output, settings, ray_address, ray_actors,
                                        overwrite=overwrite, retry_failed=retry_failed))
    if ray_actors:
        raise CliError("--ray-actors applies with --ray only")
    exit_with(lambda: run_batch(spec, inputs, output, settings, overwrite=overwrite, retry_failed=retry_failed))


def read_phrases(path: Path) -> list[str]:
    """The phrases of a --phrases-file: one a line, blank lines and lines starting with # skipped."""
    phrases = list(listed(path, "a --phrases-file", CliError))
    if not phrases:
        raise CliError(f"--phrases-file {path}: no phrases (one a line)")
    return phrases


class Terminated(KeyboardInterrupt):
    """SIGTERM, stopping a batch the way Ctrl-C does."""


@dataclass
class Summary:
    output: str
    images: int = 0  # all images named by the inputs
    done_before: int = 0  # already in the file when the run started
    failed_before: int = 0  # ... of which error records
    processed: int = 0  # written by this run
    failed: int = 0  # ... of which error records
    drawings_failed: int = 0
    seconds: float = 0.0
    interrupted: str | None = None  # "SIGINT" or "SIGTERM"

    @property
    def remaining(self) -> int:
        return self.images - self.done_before - self.processed


def run_batch(spec: TaskSpec, inputs: Sequence[str], output: Path, settings: Settings, *, overwrite: bool = False,
              retry_failed: bool = False) -> ExitCode:
    """Run `spec` over every image of `inputs`, appending one record per image to `output`."""
    from kosmos2_cli.cli.session import expand

    mark("batch: command parsed")
    reporter = Reporter(json_mode=False, quiet=settings.quiet)
    for warning in settings.check():
        reporter.warning(warning)
    names = expand(inputs, exclude=settings.annotate_dir)
    keys = {name: spec_key(spec, name) for name in names}
    wanted = set(keys.values())
    summary = Summary(str(output), images=len(names))
    results = _open_results(output, overwrite, (lambda record: record_key(record) in wanted) if retry_failed
                            else None, reporter)
    with results:
        todo = [name for name in names if keys[name] not in results.done]
        summary.done_before = len(names) - len(todo)
        summary.failed_before = sum(keys[name] in results.failed for name in names)
        if summary.done_before and todo:
            reporter.note(f"resuming: {summary.done_before} of {len(names)} images are already in {output}")
        if todo:
            _process(spec, todo, results, settings, reporter, summary)
    return _finish(summary, settings, reporter)


def run_ray_batch(spec: TaskSpec, inputs: Sequence[str], output: Path, settings: Settings, ray_address: str | None,
                  actors: int, *, overwrite: bool = False, retry_failed: bool = False) -> ExitCode:
    """`--ray`: the images answered on a Ray cluster (`batch_ray`), with the same output file, resume, summary
    and exit codes as `run_batch`; records are written in the order they come back."""
    from kosmos2_cli.cli.commands import batch_ray

    reporter = Reporter(json_mode=False, quiet=settings.quiet)
    address, listing = batch_ray.start(settings, inputs, ray_address, reporter)
    summary = Summary(str(output), images=len(listing))
    retry = batch_ray.retry_predicate(spec, output, listing) if retry_failed else None
    results = _open_results(output, overwrite, retry, reporter)
    with results:
        todo = listing.pending(results.done, spec)
        summary.done_before = len(listing) - len(todo)
        summary.failed_before = listing.count_in(results.failed, spec)
        if summary.done_before and len(todo):
            reporter.note(f"resuming: {summary.done_before} of {len(listing)} images are already in {output}")
        if len(todo):
            start = time.perf_counter()
            try:  # SIGTERM is handled once Ray has started (its core sets a handler of its own)
                batch_ray.process(spec, todo, results, settings, address, actors, reporter, _sigterm_as_interrupt)
            except KeyboardInterrupt as err:
                summary.interrupted = "SIGTERM" if isinstance(err, Terminated) else "SIGINT"
            finally:
                summary.seconds = time.perf_counter() - start
                summary.processed, summary.failed = results.appended()
    return _finish(summary, settings, reporter)


def _open_results(output: Path, overwrite: bool, retry, reporter: Reporter):
    """The output file, opened for this run (read back unless `overwrite`; `retry` picks error records to drop)."""
    from kosmos2_cli.runtime.jsonl import OutputFileError, ResultsFile

    try:
        results = ResultsFile(output, record_key, overwrite=overwrite, retry_failed=retry)
    except OutputFileError as err:
        raise CliError.of(err) from err
    if results.truncated:
        reporter.note(f"{output}: cut off a partial last line left by an interrupted run")
    if results.dropped:
        reporter.note(f"{output}: removed {results.dropped} error record(s) to retry them")
    return results


def _process(spec: TaskSpec, todo: list[str], results, settings: Settings, reporter: Reporter,
             summary: Summary) -> None:
    from kosmos2_cli.cli.session import open_engine
    from kosmos2_cli.runtime.engine import ModelLoadError
    from kosmos2_cli.runtime.runner import Runner, use_processes

    engine = open_engine(settings, reporter)
    runner = Runner(engine, spec, settings.batch_size or None, settings.workers or None, notice=reporter.warning,
                    processes=use_processes(len(todo)), keep_images=bool(settings.annotate_dir))
    drawings: list[Future] = []
    painter = ThreadPoolExecutor(2, thread_name_prefix="kosmos2-draw") if settings.annotate_dir else None
    start = time.perf_counter()
    try:
        with _sigterm_as_interrupt(), reporter.progress(len(todo), spec.describe()) as progress:
            if progress is not None:
                engine.on_load = lambda loading: progress.update(
                progress.task_ids[0], description="loading the model" if loading else spec.describe())
            for outcome, image in runner.run(todo):
                if isinstance(outcome, Failure):
                    results.write(spec.failure_record(outcome))
                    summary.failed += 1
                    reporter.error(outcome.error)
                else:
                    results.write(outcome.to_dict())
                    mark("first record written")
                    if painter is not None:
                        drawings.append(painter.submit(_draw, image, outcome, settings.annotate_dir))
                summary.processed += 1
                if progress is not None:
                    progress.advance(progress.task_ids[0])
    except ModelLoadError as err:
        raise CliError.of(err, ExitCode.MODEL) from err
    except KeyboardInterrupt as err:
        summary.interrupted = "SIGTERM" if isinstance(err, Terminated) else "SIGINT"
    finally:
        summary.seconds = time.perf_counter() - start
        summary.processed, summary.failed = results.appended()
        if painter is not None:
            painter.shutdown(wait=True)
            for future in drawings:
                if future.exception() is not None:
                    summary.drawings_failed += 1
                    reporter.error(str(future.exception()))


def _draw(image, result, folder: Path) -> None:
    from kosmos2_cli.cli.draw import annotated_path, save_annotated

    save_annotated(image, result, annotated_path(folder, result.image))


def _finish(summary: Summary, settings: Settings, reporter: Reporter) -> ExitCode:
    failed = summary.failed + summary.failed_before
    if settings.json:
        sys.stdout.write(json.dumps({**asdict(summary), "seconds": round(summary.seconds, 3)}) + "\n")
    if summary.interrupted:
        reporter.error(f"interrupted: {summary.done_before + summary.processed} of {summary.images} images are in "
                       f"{summary.output} ({summary.remaining} to go); run the same command again to finish")
        return ExitCode.TERMINATED if summary.interrupted == "SIGTERM" else ExitCode.INTERRUPTED
    if summary.processed:
        rate = summary.processed / summary.seconds if summary.seconds > 0 else 0.0
        reporter.note(f"done: {summary.processed} image{'s' * (summary.processed != 1)} in {summary.seconds:.1f} s "
                      f"({rate:.2f} images/s) → {summary.output}", style="green")
    elif summary.images:
        reporter.note(f"nothing to do: all {summary.images} images are already in {summary.output}")
    if failed:
        before = f" ({summary.failed_before} in earlier runs; --retry-failed retries them)" if (
            summary.failed_before) else ""
        reporter.error(f"{failed} of {summary.images} images failed{before}; their records have an \"error\" field: "
                       f"jq 'select(.error)' {summary.output}")
    if summary.drawings_failed:
        reporter.error(f"{summary.drawings_failed} drawing(s) could not be written")
    return ExitCode.FAILED if failed or summary.drawings_failed else ExitCode.OK


@contextmanager
def _sigterm_as_interrupt():
    """While a batch runs, SIGTERM stops it like Ctrl-C: the lines written stay, the summary says how far it got."""

    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
