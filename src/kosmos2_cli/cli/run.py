"""`kosmos2 caption|ground|refer|ask`: one task over the given images, results on the terminal (or JSON lines).

Also what every task command shares: choosing the device, finding the model, building the engine, each with
its own one-line error and exit code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kosmos2_cli.api.results import Failure
from kosmos2_cli.api.tasks import TaskSpec
from kosmos2_cli.cli.errors import CliError, ExitCode
from kosmos2_cli.cli.options import Settings
from kosmos2_cli.cli.render import Reporter


def expand(inputs: Sequence[str], exclude: Path | None = None) -> list[str]:
    """The images named by INPUTS (usage error when one names nothing), less those under `exclude`."""
    from kosmos2_cli.runtime.inputs import InputError, expand_inputs

    try:
        names = expand_inputs(inputs)
    except InputError as err:
        raise CliError(str(err)) from err
    if exclude is not None:
        root = exclude.resolve()
        names = [n for n in names if not Path(n).resolve().is_relative_to(root)]
        if not names:
            raise CliError(f"no images left: every input is inside the --annotate-dir {exclude}")
    return names


def open_engine(settings: Settings, reporter: Reporter):
    """The engine for the settings: device and dtype checked, model found (downloaded once), tokenizer loaded."""
    from kosmos2_cli.fast import early

    early.start_cuda(settings.device)  # the GPU's driver starts while torch is imported
    from kosmos2_cli.model.devices import resolve_device, resolve_dtype
    from kosmos2_cli.runtime.engine import ModelLoadError, PipelineEngine

    try:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
    except ValueError as err:
        raise CliError(str(err)) from err
    folder = find_model(settings.model, settings.revision, reporter)
    try:
        return PipelineEngine(folder, device, dtype, settings.generation_options())
    except ModelLoadError as err:
        raise CliError(str(err), ExitCode.MODEL) from err


def find_model(model: str, revision: str | None, reporter: Reporter) -> Path:
    """A local folder holding the model: `model` itself, its cached snapshot, or a fresh download into the cache."""
    from kosmos2_cli.model.hub import ModelNotFoundError, cached_model_dir, offline_mode, resolve_model_dir

    local = Path(model).expanduser()
    if local.is_dir():
        return local
    try:
        cached = cached_model_dir(model, revision)
        if cached is not None:
            return cached
        if not local.exists() and not offline_mode():  # offline, the error below says what to do instead
            reporter.note(f"downloading {model} into the Hugging Face cache (once; later runs use the cache)")
        if reporter.quiet:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        return resolve_model_dir(model, revision)
    except ModelNotFoundError as err:
        raise CliError(str(err), ExitCode.MODEL) from err


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
            raise CliError(str(err), ExitCode.MODEL) from err
    if failed and len(names) > 1:
        reporter.error(f"{failed} of {len(names)} images failed")
    return ExitCode.FAILED if failed or drawing_failed else ExitCode.OK


def _check_drawing_path(path: Path) -> None:
    from kosmos2_cli.cli.draw import DrawError, check_output_path

    try:
        check_output_path(path)
    except DrawError as err:
        raise CliError(str(err)) from err


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
