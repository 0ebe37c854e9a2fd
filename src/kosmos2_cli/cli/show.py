"""`kosmos2 caption|ground|refer|ask`: one task over the given images, results on the terminal (or JSON lines)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kosmos2_cli.api.results import Failure
from kosmos2_cli.api.tasks import TaskSpec
from kosmos2_cli.cli.errors import CliError, ExitCode
from kosmos2_cli.cli.options import Settings
from kosmos2_cli.cli.render import Reporter
from kosmos2_cli.cli.session import expand, open_engine


def run_task(spec: TaskSpec, inputs: Sequence[str], settings: Settings) -> ExitCode:
    """Run `spec` over the images of `inputs`; results to stdout as they are done."""
    from kosmos2_cli.runtime.engine import ModelLoadError
    from kosmos2_cli.runtime.runner import Runner

    reporter = Reporter(json_mode=settings.json, quiet=settings.quiet)
    for warning in settings.check():
        reporter.warning(warning)
    if settings.draw is not None:
        _check_drawing_path(settings.draw)
    names = expand(inputs, exclude=settings.annotate_dir)
    if settings.draw is not None and len(names) > 1:
        raise CliError(f"--draw writes one image, and {len(names)} are given; use --annotate-dir DIR for several")
    engine = open_engine(settings, reporter)
    runner = Runner(engine, spec, settings.batch_size or None, settings.workers or None, notice=reporter.warning)
    failed = 0
    drawing_failed = False
    with reporter.progress(len(names), spec.describe(), bar=len(names) > 1) as progress:
        if progress is not None:
            engine.on_load = lambda loading: progress.update(
                progress.task_ids[0], description="loading the model" if loading else spec.describe())
        try:
            for outcome, image in runner.run(names):
                if progress is not None:
                    progress.advance(progress.task_ids[0])
                if isinstance(outcome, Failure):
                    failed += 1
                    reporter.failure(outcome, spec.failure_record(outcome))
                    continue
                reporter.result(outcome)
                for path in _drawing_paths(settings, outcome.image):
                    drawing_failed |= not _draw(image, outcome, path, reporter)
        except ModelLoadError as err:
            raise CliError.of(err, ExitCode.MODEL) from err
    if failed and len(names) > 1:
        reporter.error(f"{failed} of {len(names)} images failed")
    return ExitCode.FAILED if failed or drawing_failed else ExitCode.OK


def _check_drawing_path(path: Path) -> None:
    from kosmos2_cli.cli.draw import DrawError, check_output_path

    try:
        check_output_path(path)
    except DrawError as err:
        raise CliError.of(err) from err


def _drawing_paths(settings: Settings, name: str) -> list[Path]:
    paths = []
    if settings.draw is not None:
        paths.append(settings.draw)
    if settings.annotate_dir is not None:
        from kosmos2_cli.cli.draw import annotated_path

        paths.append(annotated_path(settings.annotate_dir, name))
    return paths


def _draw(image, result, path: Path, reporter: Reporter) -> bool:
    """Draw one result; a failure is reported, and the run goes on."""
    from kosmos2_cli.cli.draw import DrawError, save_annotated

    try:
        save_annotated(image, result, path)
    except DrawError as err:
        reporter.error(str(err))
        return False
    reporter.note(f"drawn: {path}")
    return True
