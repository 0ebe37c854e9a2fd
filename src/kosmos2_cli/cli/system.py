"""`kosmos2 info` and `kosmos2 download`: the installation, the device, and the model in the hub cache."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

from kosmos2_cli import __version__
from kosmos2_cli.cli.errors import ExitCode


def gather_info(model: str, revision: str | None = None) -> dict[str, Any]:
    """Versions, devices and the model's whereabouts, without touching the network."""
    import huggingface_hub
    import torch

    from kosmos2_cli.model.devices import resolve_device, resolve_dtype
    from kosmos2_cli.model.hub import cached_model_dir, offline_mode

    device = resolve_device("auto")
    cuda = torch.cuda.is_available()
    gpus = []
    for index in range(torch.cuda.device_count() if cuda else 0):
        props = torch.cuda.get_device_properties(index)
        gpus.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                     "capability": f"{props.major}.{props.minor}"})
    local = Path(model).expanduser()
    folder = local if local.is_dir() else cached_model_dir(model, revision)
    return {
        "kosmos2_cli": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "cuda": {"available": cuda, "version": torch.version.cuda, "devices": gpus},
        "auto_device": str(device),
        "auto_dtype": str(resolve_dtype("auto", device)).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "model": {
            "name": model,
            "revision": revision,
            "local_folder": local.is_dir(),
            "cached": folder is not None,
            "path": str(folder) if folder else None,
            "size_bytes": _size(folder) if folder else None,
        },
        "hub_cache": _hub_cache(),
        "offline": offline_mode(),
    }


def show_info(model: str, revision: str | None, as_json: bool) -> None:
    info = gather_info(model, revision)
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_row("kosmos2-cli", info["kosmos2_cli"])
    table.add_row("python", f"{info['python']} ({info['platform']})")
    table.add_row("torch", f"{info['torch']} ({info['threads']} CPU threads)")
    table.add_row("huggingface_hub", info["huggingface_hub"])
    cuda = info["cuda"]
    if cuda["available"]:
        names = "; ".join(f"cuda:{g['index']} {g['name']} {g['memory_gib']} GiB (sm {g['capability']})"
                          for g in cuda["devices"])
        table.add_row("CUDA", f"{cuda['version']}: {names}")
    else:
        table.add_row("CUDA", Text("not available", style="yellow"))
    table.add_row("auto picks", f"{info['auto_device']}, {info['auto_dtype']}")
    entry = info["model"]
    if entry["cached"]:
        where = "local folder" if entry["local_folder"] else "cached"
        state = Text.assemble((where, "green"), f": {entry['path']} ({_human(entry['size_bytes'])})")
    else:
        state = Text.assemble(("not cached", "yellow"), " (run 'kosmos2 download' where the network is available)")
    table.add_row("model", Text.assemble(f"{entry['name']} ", state))
    table.add_row("hub cache", info["hub_cache"] + (" (offline: HF_HUB_OFFLINE)" if info["offline"] else ""))
    Console(highlight=False).print(table)


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
            err.print(Text.assemble(("error", "bold red"), f": {problem}"))
            return ExitCode.MODEL
        out.print(f"{model} is a local model folder; nothing to download")
        return ExitCode.OK
    cached = cached_model_dir(model, revision)
    if not quiet and cached is None:
        err.print(Text(f"downloading {model} into {_hub_cache()} (only the files kosmos2 reads)", style="dim"))
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        folder = resolve_model_dir(model, revision)
    except ModelNotFoundError as problem:
        err.print(Text.assemble(("error", "bold red"), f": {problem}"))
        return ExitCode.MODEL
    state = "already in the cache" if cached is not None and Path(cached) == Path(folder) else "downloaded"
    out.print(Text.assemble((f"{model}", "bold"), f" {state}: {folder} ({_human(_size(folder))})"))
    return ExitCode.OK


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _size(folder: Path) -> int:
    # Cached snapshots are symlinks into blobs/: count what they point at.
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def _human(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
