"""Shared by the benchmarks: one set of full-size random weights in the hub's layout, built once and cached."""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # oracle.py: the released tokenizer and preprocessing files


def run_cli(command: list[str]) -> int | str | None:
    """`kosmos2 COMMAND...` in this process, as a user runs it (a leading `--` dropped): its exit code. A command
    that names a Python file runs that script instead (e.g. `serve.py --only ours`, found beside this file)."""
    import runpy

    command = command[1:] if command[:1] == ["--"] else command
    script = Path(command[0]) if command and command[0].endswith(".py") else None
    if script is not None and not script.exists():
        script = Path(__file__).parent / script.name
    sys.argv = [str(script), *command[1:]] if script else ["kosmos2", *command]
    try:
        if script:
            runpy.run_path(str(script), run_name="__main__")
        else:
            runpy.run_module("kosmos2_cli", run_name="__main__")
    except SystemExit as exit_:
        return exit_.code
    return 0


def full_size_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Random weights of the released architecture (1.66 B params, fp32 safetensors, ~6.6 GB), made once."""
    done = folder / "DONE"
    if done.exists():
        return folder
    import torch

    from kosmos2_cli import Kosmos2Config

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    try:
        from transformers import Kosmos2Config as RefConfig
        from transformers import Kosmos2ForConditionalGeneration as Reference

        Reference(RefConfig()).save_pretrained(str(folder))  # the reference's own initialisation
    except ImportError:
        from kosmos2_cli import Kosmos2ForConditionalGeneration

        model = Kosmos2ForConditionalGeneration(Kosmos2Config())
        for p in model.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, std=0.02)
        model.save_pretrained(folder)
    write_tokenizer_files(folder)
    done.write_text("ok")
    return folder


def write_tokenizer_files(folder: Path) -> None:
    """The released tokenizer and preprocessing files (from ../shared, or KOSMOS2_SHARED on another machine)."""
    from oracle import write_tokenizer_files as write

    write(folder)


def warm_file_cache(folder: Path) -> None:
    """Read every weight file once so that load times measure a warm page cache."""
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as f:
            while f.read(1 << 26):
                pass


def median_time(fn, repeat: int, sync=None) -> float:
    times = []
    for _ in range(repeat):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graph_time(calls: list, repeat: int = 10) -> float:
    """Median seconds per call of `calls` (thunks launching GPU work) captured in one CUDA graph and replayed:
    launch gaps as small as the GPU allows, timed with events."""
    import torch

    for call in calls[:2]:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3 / len(calls))
    return statistics.median(times)


def dump(path: Path | None, data: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(data, indent=2))


def synthetic_image(seed: int = 0, size=(640, 480)):
    """The benchmarks' picture: seeded noise (the weights are random, so content does not matter)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
