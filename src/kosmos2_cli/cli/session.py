"""What every command that runs the model shares: the images named, the device and dtype checked, the model
found (downloaded once), the engine built; each problem with its own one-line error and exit code."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kosmos2_cli.cli.errors import CliError, ExitCode
from kosmos2_cli.cli.options import Settings
from kosmos2_cli.cli.render import Reporter


def expand(inputs: Sequence[str], exclude: Path | None = None) -> list[str]:
    """The images named by INPUTS (usage error when one names nothing), less those under `exclude`."""
    from kosmos2_cli.runtime.inputs import InputError, expand_inputs

    try:
        names = expand_inputs(inputs)
    except InputError as err:
        raise CliError.of(err) from err
    if exclude is not None:
        root = exclude.resolve()
        names = [n for n in names if not Path(n).resolve().is_relative_to(root)]
        if not names:
            raise CliError(f"no images left: every input is inside the --annotate-dir {exclude}")
    return names


def open_engine(settings: Settings, reporter: Reporter):
    """The engine for the settings: device and dtype checked, model found (downloaded once), tokenizer loaded."""
    from kosmos2_cli.fast import early
    from kosmos2_cli.fast.marks import mark

    early.start_cuda(settings.device)  # the GPU's driver starts while torch is imported
    from kosmos2_cli.model.devices import resolve_device, resolve_dtype
    from kosmos2_cli.runtime.engine import ModelLoadError, PipelineEngine

    mark("engine: imports done")

    try:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
    except ValueError as err:
        raise CliError.of(err) from err
    folder = find_model(settings.model, settings.revision, reporter)
    try:
        # Every command that opens an engine runs the model: its weights load from here on, beside the rest.
        engine = PipelineEngine(folder, device, dtype, settings.generation_options(), refill_share=refill_share(),
                                preload=True, first_batch=first_batch())
        mark("engine: tokenizer loaded")
        return engine
    except ModelLoadError as err:
        raise CliError.of(err, ExitCode.MODEL) from err


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
        raise CliError.of(err, ExitCode.MODEL) from err


def refill_share() -> float | None:
    """KOSMOS2_REFILL_SHARE: refill the rows once this share of them is free (1: static batches; unset: the
    scheduler's default). A tuning knob for benchmarks and odd workloads."""
    import os

    value = os.environ.get("KOSMOS2_REFILL_SHARE", "").strip()
    if not value:
        return None
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0 <= share <= 1:
        raise CliError(f"KOSMOS2_REFILL_SHARE must be a number from 0 to 1 (got {value!r})")
    return share


def first_batch() -> int | None:
    """KOSMOS2_FIRST_BATCH: the prompts of a run's first refill, decoded alone before the rows fill (0: none;
    unset: 16 on a GPU, none on a CPU). A tuning knob for benchmarks."""
    import os

    value = os.environ.get("KOSMOS2_FIRST_BATCH", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise CliError(f"KOSMOS2_FIRST_BATCH must be a whole number, 0 or more (got {value!r})")
    return int(value)
