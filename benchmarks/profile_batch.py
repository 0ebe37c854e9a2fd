"""A window of the GPU's timeline during `kosmos2 batch`: how busy it is, how long a decode step takes on it,
and where it waits, from any tree of this package (the command runs as it does for a user).

`PYTHONPATH=<tree>/src python benchmarks/profile_batch.py --after 6 --seconds 2 --json OUT -- batch DIR -o X ...`
(`-- serve.py --only ours --levels 256`: the service under load instead). With a window that lasts to the end of
the command (`--after 5 --seconds 600`), the records written meanwhile give the GPU time per record and per
kernel: what one tree's scheduler spends beside another's.

After `--after` seconds the profiler (CUDA activity only: CUPTI sees every stream of the process, whichever
thread launched) records `--seconds`; the kernels' intervals are then summarised: GPU busy share (their union
over the window), kernels and copies, decode steps (launches of the decode attention kernel over the layers),
GPU time per step, and the longest idle gaps with the kernels either side.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
from collections import Counter
from pathlib import Path

from common import run_cli

FINISHED = threading.Event()  # the command has returned: a window still open closes


def records(output: Path | None) -> int | None:
    return output.read_bytes().count(b"\n") if output is not None and output.exists() else None


def profile_window(after: float, seconds: float, out: dict, output: Path | None) -> None:
    """Record the GPU from `after` s for `seconds` (or until the command ends); with the command's output file,
    also how many records it gained meanwhile, so that GPU time can be told per image."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if FINISHED.wait(after):
        return
    trace = Path(tempfile.mkdtemp()) / "trace.json"
    prof = profile(activities=[ProfilerActivity.CUDA], acc_events=True)
    prof.start()
    first = records(output)
    FINISHED.wait(seconds)
    torch.cuda.synchronize()
    last = records(output)
    prof.stop()
    prof.export_chrome_trace(str(trace))
    out.update(summarise(json.loads(trace.read_text())))
    if first is not None and last is not None:
        out["records_in_window"] = last - first


GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # the trace's categories of work on the device


def summarise(trace: dict) -> dict:
    everything = trace.get("traceEvents", [])
    events = sorted((e for e in everything if e.get("ph") == "X" and e.get("cat") in GPU_WORK), key=lambda e: e["ts"])
    if not events:  # say what the trace held instead
        return {"kernels": 0, "categories": dict(Counter(str(e.get("cat")) for e in everything))}
    start, end = events[0]["ts"], max(e["ts"] + e["dur"] for e in events)
    busy, reach = 0.0, start
    gaps: list[tuple[float, str, str]] = []
    previous = ""
    for e in events:
        if e["ts"] > reach:
            gaps.append((e["ts"] - reach, previous, e["name"]))
        busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], reach))
        if e["ts"] + e["dur"] > reach:
            reach, previous = e["ts"] + e["dur"], e["name"]
    kernels = [e for e in events if e["cat"] == "kernel"]
    attention = sum(1 for e in kernels if "decode_attention" in e["name"])
    window = end - start
    by_name = Counter()
    for e in kernels:
        by_name[e["name"][:60]] += e["dur"]
    gap_total = sum(g for g, _, _ in gaps)
    gaps.sort(reverse=True)
    return {
        "window_ms": round(window / 1e3, 2), "busy_share": round(busy / window, 4),
        "kernels": len(kernels), "copies": sum(1 for e in events if e["cat"] != "kernel"),
        "copy_ms": round(sum(e["dur"] for e in events if e["cat"] != "kernel") / 1e3, 2),
        "decode_attention_launches": attention,
        "gaps_over_20us": sum(1 for g, _, _ in gaps if g > 20), "gap_ms": round(gap_total / 1e3, 2),
        "longest_gaps_us": [(round(g, 1), a[:50], b[:50]) for g, a, b in gaps[:25]],
        "kernel_ms_by_name": {k: round(v / 1e3, 2) for k, v in by_name.most_common(40)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--after", type=float, default=6.0)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (decode steps = launches / layers)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    out: dict = {}
    output = Path(args.command[args.command.index("-o") + 1]) if "-o" in args.command[:-1] else None
    watcher = threading.Thread(target=profile_window, args=(args.after, args.seconds, out, output), daemon=True)
    watcher.start()
    out["exit"] = run_cli(args.command)
    FINISHED.set()
    watcher.join(timeout=120)
    if out.get("decode_attention_launches"):
        steps = out["decode_attention_launches"] / args.layers
        out["decode_steps"] = round(steps, 1)
        out["gpu_busy_ms_per_step"] = round(out["window_ms"] * out["busy_share"] / steps, 3)
        out["window_ms_per_step"] = round(out["window_ms"] / steps, 3)
    if out.get("records_in_window") and "busy_share" in out:  # a window to the end: GPU work per record
        images = out["records_in_window"]
        out["gpu_busy_ms_per_record"] = round(out["window_ms"] * out["busy_share"] / images, 4)
        out["kernel_us_per_record"] = {k: round(v * 1e3 / images, 1) for k, v in out["kernel_ms_by_name"].items()}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
