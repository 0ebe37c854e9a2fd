"""Where the model's thread spends its time during `kosmos2 batch`, and what it was doing when the GPU starved.

`PYTHONPATH=<tree>/src python benchmarks/host_timing.py --json OUT -- batch DIR -o X --model W ...`
`... host_timing.py --json OUT -- serve.py --only ours --levels 256`: the service's model thread under load.

The command runs in this process as it does for a user, with timers around the row scheduler's phases (refill,
step, reading flags, harvest, handing answers out), the staging of pixels, the pace of the writer and the image
encoder, plus a probe thread that measures how late a 1 ms sleep wakes (how long Python's lock is held by
others). Between two decode-step launches the model's thread normally spends a few ms; each interval over
`--stall-ms` is a stall: its length and the phases inside it, longest first. On CUDA a stall the GPU cannot
cover (its queue is `lookahead` steps deep) is idle device time: profile_batch.py shows those gaps.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path

from common import run_cli

TOTALS: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0.0])  # (thread, phase): n, s, max
INTERVAL: dict[str, float] = defaultdict(float)  # phases since the model thread's last step launch
STALLS: list[tuple[float, dict[str, float]]] = []
GAPS: list[float] = []
LAST_STEP = [0.0]
PROBE: list[float] = []
STOP = threading.Event()
STALL_S = 0.015  # a step interval longer than this is a stall (--stall-ms)
MODEL_THREADS = {"kosmos2-model", "kosmos2-serve-model"}  # `kosmos2 batch`'s, the service's
# Phases the model thread enters directly from the loop (nested ones are inside these)
TOP_LEVEL = {"step", "read_flags", "free_capped", "drop_cancelled", "admit (all)", "answers handed out (consumer)"}


def _count(label: str, took: float) -> None:
    thread = threading.current_thread().name
    thread = thread.rsplit("_", 1)[0] if thread.startswith("ThreadPoolExecutor") else thread  # a pool as one
    entry = TOTALS[(thread, label)]
    entry[0] += 1
    entry[1] += took
    entry[2] = max(entry[2], took)
    if thread in MODEL_THREADS:
        INTERVAL[label] += took


def timed(owner, name: str, label: str, is_step: bool = False) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        if is_step:
            if LAST_STEP[0]:
                gap = start - LAST_STEP[0]
                GAPS.append(gap)
                if gap > STALL_S:
                    STALLS.append((gap, dict(INTERVAL)))
            INTERVAL.clear()
            LAST_STEP[0] = start
        try:
            return original(*args, **kwargs)
        finally:
            _count(label, time.perf_counter() - start)

    setattr(owner, name, wrapper)


def timed_generator(owner, name: str, label: str) -> None:
    """Time spent by the consumer of a generator between its yields (the model thread's caller)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        inner = original(*args, **kwargs)
        while True:
            try:
                item = next(inner)
            except StopIteration:
                return
            start = time.perf_counter()
            yield item
            _count(label, time.perf_counter() - start)

    setattr(owner, name, wrapper)


def probe() -> None:
    while not STOP.is_set():
        start = time.perf_counter()
        time.sleep(0.001)
        PROBE.append(time.perf_counter() - start - 0.001)


def install() -> None:
    from kosmos2_cli.api.pipeline import Kosmos2
    from kosmos2_cli.generation import rows
    from kosmos2_cli.runtime import runner, stager

    timed(rows._Rows, "_step", "step", is_step=True)
    for name in ("_refill", "_read_flags", "_harvest", "_free_capped", "_drop_cancelled"):
        timed(rows._Rows, name, name.strip("_"))
    timed(rows._Rows, "_admit", "admit (all)")
    timed_generator(rows._Rows, "_delivered", "answers handed out (consumer)")
    timed(stager.Stager, "take", "stager.take")
    timed(stager.Stager, "_wait_ahead", "stager wait for staging")
    timed(stager.Stager, "_stage", "stage (collate)")
    timed(stager.Staged, "take", "staged.take")
    timed(runner.Pace, "ready", "pace.ready")
    timed(Kosmos2, "encode_pixels", "encode_pixels")
    from kosmos2_cli.serve.scheduler import Scheduler  # the service's (no web stack needed)

    timed(Scheduler, "_take", "serve: take (hold, encode)")
    timed(Scheduler, "prepare", "serve: prepare an upload")
    timed(Scheduler, "finish", "serve: record")


def quantiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    at = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 3)  # noqa: E731
    return {"n": len(values), "median_ms": round(statistics.median(values) * 1e3, 3), "p90_ms": at(0.9),
            "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1e3, 3), "sum_s": round(sum(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stall-ms", type=float, default=15.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    global STALL_S
    STALL_S = args.stall_ms / 1e3
    install()
    threading.Thread(target=probe, daemon=True, name="probe").start()
    start = time.perf_counter()
    out: dict = {"exit": run_cli(args.command)}
    STOP.set()
    out["wall_s"] = round(time.perf_counter() - start, 3)
    out["step_intervals"] = quantiles(GAPS)
    out["gil_probe_lateness"] = quantiles(PROBE)
    out["phases"] = {f"{thread}: {label}": {"n": n, "s": round(s, 3), "max_ms": round(most * 1e3, 2)}
                     for (thread, label), (n, s, most) in sorted(TOTALS.items(), key=lambda kv: -kv[1][1])}
    STALLS.sort(key=lambda stall: -stall[0])
    out["stalls"] = {"n": len(STALLS), "sum_s": round(sum(g for g, _ in STALLS), 3),
                     "longest": [{"ms": round(g * 1e3, 1), **{k: round(v * 1e3, 1) for k, v in inside.items()}}
                                 for g, inside in STALLS[:15]]}
    # What the stalls' time went to, summed over all of them (the rest: outside the timed phases)
    spent: dict[str, float] = defaultdict(float)
    for gap, inside in STALLS:
        for k, v in inside.items():
            spent[k] += v
        spent["(untimed)"] += gap - sum(v for k, v in inside.items() if k in TOP_LEVEL)
    out["stalls"]["by_phase_s"] = {k: round(v, 3) for k, v in sorted(spent.items(), key=lambda kv: -kv[1])}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
