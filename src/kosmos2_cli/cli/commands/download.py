"""`kosmos2 download`: the model's files (only those kosmos2 reads) into the Hugging Face cache, ahead of time."""

from pathlib import Path
from typing import Annotated

import typer

from kosmos2_cli.cli.errors import CliError, ExitCode
from kosmos2_cli.model.hub import DEFAULT_MODEL


def download(
    model: Annotated[str, typer.Option("--model", "-m", metavar="REPO", envvar="KOSMOS2_MODEL",
                                       help="Hub repo id to fetch.")] = DEFAULT_MODEL,
    revision: Annotated[str | None, typer.Option("--revision", metavar="REV",
                                                 help="Hub branch, tag or commit.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Fetch the model into the Hugging Face cache ahead of time (only the files kosmos2 reads).

    Honours HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN.
    """
    raise typer.Exit(download_model(model, revision, quiet=quiet))


def download_model(model: str, revision: str | None = None, quiet: bool = False) -> ExitCode:
    """Fetch the model's files into the hub cache, with progress bars; say where they are."""
    from rich.console import Console
    from rich.text import Text

    from kosmos2_cli.model.hub import ModelNotFoundError, cached_model_dir, resolve_model_dir

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False, soft_wrap=True)
    local = Path(model).expanduser()
    if local.is_dir():
        from kosmos2_cli.runtime.engine import ModelLoadError, check_model_folder

        try:
            check_model_folder(local)
        except ModelLoadError as problem:
            err.print(Text.assemble(("error", "bold red"), f": {CliError.of(problem)}"))
            return ExitCode.MODEL
        out.print(f"{model} is a local model folder; nothing to download")
        return ExitCode.OK
    cached = cached_model_dir(model, revision)
    if not quiet and cached is None:
        err.print(Text(f"downloading {model} into {hub_cache()} (only the files kosmos2 reads)", style="dim"))
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        folder = resolve_model_dir(model, revision)
    except ModelNotFoundError as problem:
        err.print(Text.assemble(("error", "bold red"), f": {CliError.of(problem)}"))
        return ExitCode.MODEL
    state = "already in the cache" if cached is not None and Path(cached) == Path(folder) else "downloaded"
    out.print(Text.assemble((f"{model}", "bold"), f" {state}: {folder} ({human_size(folder_size(folder))})"))
    return ExitCode.OK


def hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def folder_size(folder: Path) -> int:
    # Cached snapshots are symlinks into blobs/: count what they point at.
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def human_size(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
