"""`kosmos2 batch --ray` over 1..N GPUs of one machine beside plain `kosmos2 batch` on one GPU, same run.

    python benchmarks/ray_scaling.py --images 16384                # GPUs 1..all, plain batch as the baseline
    python benchmarks/ray_scaling.py --images 8192 --gpus 1 --repeat 3 --json ray.json
    python benchmarks/ray_scaling.py --images 8192 --gpus 1 --ray-batch 4096    # longer actor calls
    python benchmarks/ray_scaling.py --smoke                       # CPU, tiny random model: proves it runs

The images are benchmarks/startup.py's (`--batch N`): N generated 640x480 JPEGs, made once. Every run is a new
`kosmos2` process as a user starts it, full-size random weights, bf16, `--max-new-tokens 64` (random weights
rarely stop early); `--ray` runs start their own local Ray cluster over the first G GPUs (CUDA_VISIBLE_DEVICES),
one model actor per GPU. Runs alternate (plain, ray 1, ray 2, ..., then again) so drift hits all alike.

Prints, per configuration, the medians of: wall-clock seconds of the whole command (Ray's start included),
images/s over the wall clock, and steady images/s (the output file's growth from its first records to its last,
start-up excluded; use enough images for several actor calls per GPU), with the ratio of each to plain batch
on one GPU. The issue's bar: `--ray` on one GPU
within 5% of plain batch, steady.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def env_for(work: Path, gpus: int | None, smoke: bool, ray_batch: int) -> dict:
    from gpu import subprocess_env

    env = subprocess_env(work)
    if ray_batch:
        env["KOSMOS2_RAY_BATCH"] = str(ray_batch)  # images per actor call
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if gpus is not None and not smoke:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def one_run(name: str, command: list[str], env: dict, records: Path, count: int) -> dict:
    """Run `command` (a kosmos2 batch writing `records`), watching the file grow."""
    records.unlink(missing_ok=True)
    t0 = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress: list[tuple[float, int]] = []
    while child.poll() is None:
        time.sleep(0.05)
        if records.exists():
            progress.append((time.perf_counter() - t0, records.read_bytes().count(b"\n")))
    wall = time.perf_counter() - t0
    stdout, stderr = child.communicate()
    done = records.read_bytes().count(b"\n") if records.exists() else 0
    progress.append((wall, done))

    def at(n: int) -> float:
        return next(t for t, k in progress if k >= max(1, n))

    # Steady: from the first records to the last, start-up excluded. `--ray` writes records a call (2048 images)
    # at a time, so the span runs from the first arrival to the last, whatever its granularity.
    first_t, first_k = next(((t, k) for t, k in progress if k >= 1), (wall, 0))
    last_t = at(done) if done else wall
    steady = (done - first_k) / (last_t - first_t) if last_t > first_t else float("nan")
    out = {"exit": child.returncode, "records": done, "wall_s": wall, "images_per_s_wall": done / wall,
           "images_per_s_steady": steady, "first_record_s": at(1) if done else float("nan")}
    if child.returncode != 0 or done != count:
        out["stderr"] = stderr[-2000:]
    print(f"  {name}: exit {child.returncode}, {done}/{count} records, wall {wall:.1f} s, "
          f"{out['images_per_s_wall']:.1f} images/s wall, {steady:.1f} steady", flush=True)
    if "stderr" in out:
        print(out["stderr"], flush=True)
    return out


def configurations(args) -> list[tuple[str, int | None, list[str]]]:
    """(name, GPUs visible, extra arguments): plain batch first, then --ray on each GPU count."""
    plain = [("plain batch, 1 GPU" if not args.smoke else "plain batch, CPU", 1, [])]
    counts = args.gpus
    rays = [(f"--ray, {g} GPU{'s' * (g != 1)}" if not args.smoke else f"--ray, {g} CPU actor{'s' * (g != 1)}", g,
             ["--ray", "--ray-address", "local", "--ray-actors", str(g)]) for g in counts]
    return plain + rays


def main(args) -> dict:
    sys.path.insert(0, str(HERE))
    from gpu import fill_bytecode_cache, make_jpegs

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        weights = work / "kosmos2-ray-smoke"
        if not (weights / "config.json").exists():
            sys.path.insert(0, str(ROOT / "tests"))
            import oracle

            oracle.save_reference_checkpoint(weights, oracle.tiny_config(latent_query_num=64))
        count, tokens, device = args.images or 16, 8, ["--device", "cpu", "--batch-size", "4"]
    else:
        from common import full_size_checkpoint

        weights = full_size_checkpoint(args.weights)
        count, tokens, device = args.images, 64, []
    images = work / f"kosmos2-e2e-{count}"
    make_jpegs(images, count)
    fill_bytecode_cache(work, {})
    records = work / "ray-scaling.jsonl"
    base = [sys.executable, "-m", "kosmos2_cli", "batch", str(images), "-o", str(records), "--model", str(weights),
            "--max-new-tokens", str(tokens), "--json", "--quiet", *device, *args.extra]
    runs: dict[str, list[dict]] = {}
    plan = configurations(args)
    for round_ in range(args.repeat):
        print(f"round {round_ + 1} of {args.repeat}", flush=True)
        for name, gpus, extra in plan:
            env = env_for(work, gpus, args.smoke, args.ray_batch)
            runs.setdefault(name, []).append(one_run(name, base + extra, env, records, count))
    return summarize(runs, plan, count)


def summarize(runs: dict[str, list[dict]], plan, count: int) -> dict:
    table = {}
    for name, _, _ in plan:
        ok = [r for r in runs[name] if r["exit"] == 0 and r["records"] == count]
        table[name] = {key: statistics.median(r[key] for r in ok) if ok else float("nan")
                       for key in ("wall_s", "images_per_s_wall", "images_per_s_steady", "first_record_s")}
        table[name]["ok_runs"] = len(ok)
    baseline = table[plan[0][0]]
    print(f"\n{count} images; medians over {len(runs[plan[0][0]])} runs each\n")
    print(f"{'configuration':24} {'wall s':>8} {'img/s wall':>11} {'x plain':>8} {'img/s steady':>13} {'x plain':>8}"
          f" {'1st record s':>13}")
    for name, row in table.items():
        row["wall_ratio"] = row["images_per_s_wall"] / baseline["images_per_s_wall"]
        row["steady_ratio"] = row["images_per_s_steady"] / baseline["images_per_s_steady"]
        print(f"{name:24} {row['wall_s']:8.2f} {row['images_per_s_wall']:11.1f} {row['wall_ratio']:8.3f} "
              f"{row['images_per_s_steady']:13.1f} {row['steady_ratio']:8.3f} {row['first_record_s']:13.2f}")
    one = next((row for name, row in table.items() if name.startswith("--ray, 1 ")), None)
    if one is not None:
        print(f"\n--ray on one {'GPU' if 'GPU' in next(iter(table)) else 'CPU actor'}: steady "
              f"{one['steady_ratio']:.3f} x plain batch (bar: >= 0.95)")
    return {"images": count, "table": table, "runs": runs}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kosmos2-full")
    parser.add_argument("--images", type=int, default=8192, help="JPEGs in the folder (smoke: 16)")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU counts for --ray (default: 1..all)")
    parser.add_argument("--repeat", type=int, default=2, help="rounds of every configuration")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kosmos2-ray-bench")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the results here")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny random model, 16 images, one actor")
    parser.add_argument("--ray-batch", type=int, default=0, metavar="N",
                        help="images per actor call (KOSMOS2_RAY_BATCH; default 2048 on GPUs; smoke: 4)")
    parser.add_argument("--extra", nargs="*", default=[], metavar="ARG", help="more kosmos2 batch arguments")
    ARGS = parser.parse_args()
    if ARGS.smoke:
        ARGS.images = ARGS.images if ARGS.images != 8192 else 16
        ARGS.gpus = [1]
        ARGS.ray_batch = ARGS.ray_batch or 4
    elif ARGS.gpus:
        ARGS.gpus = [int(g) for g in ARGS.gpus.split(",")]
    else:
        import torch

        ARGS.gpus = list(range(1, torch.cuda.device_count() + 1))
    if ARGS.smoke:
        ARGS.work = Path(tempfile.gettempdir()) / "kosmos2-ray-smoke"
    result = main(ARGS)
    if ARGS.json:
        ARGS.json.parent.mkdir(parents=True, exist_ok=True)
        ARGS.json.write_text(json.dumps(result, indent=1, default=str))
        print(f"results: {ARGS.json}")
