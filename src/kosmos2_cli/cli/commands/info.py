"""`kosmos2 info`: the installation, the device and dtype `auto` picks, and the model in the hub cache."""

import json
import platform
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from kosmos2_cli import __version__
from kosmos2_cli.cli.commands.download import folder_size, hub_cache, human_size
from kosmos2_cli.model.hub import DEFAULT_MODEL


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
            "size_bytes": folder_size(folder) if folder else None,
        },
        "hub_cache": hub_cache(),
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
        state = Text.assemble((where, "green"), f": {entry['path']} ({human_size(entry['size_bytes'])})")
    else:
        state = Text.assemble(("not cached", "yellow"), " (run 'kosmos2 download' where the network is available)")
    table.add_row("model", Text.assemble(f"{entry['name']} ", state))
    table.add_row("hub cache", info["hub_cache"] + (" (offline: HF_HUB_OFFLINE)" if info["offline"] else ""))
    Console(highlight=False).print(table)




def info(
    model: Annotated[str, typer.Option("--model", "-m", metavar="REPO|DIR", envvar="KOSMOS2_MODEL",
                                       help="The model to look for.")] = DEFAULT_MODEL,
    revision: Annotated[str | None, typer.Option("--revision", metavar="REV")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="As one JSON object.")] = False,
) -> None:
    """Show versions, the device and dtype 'auto' picks, CUDA, and whether the model is cached. Never downloads."""
    show_info(model, revision, json_output)
