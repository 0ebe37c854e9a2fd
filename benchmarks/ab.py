"""A/B of two source trees on one GPU, in one call: the numbers a change must keep.

    python benchmarks/ab.py --weights /tmp/kosmos2-full --trees old=path/to/old/src new=src --out results/

For each tree, alternately and each in fresh processes: batch-1 latency and images/s at 256 and 512 (64 tokens
forced, bf16, the script path: `from_pretrained` then `generate`, calling `fuse_for_inference` only where a tree
needs it), and load to first token in a new process. Prints one table, medians, the ratio new/old.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "<grounding> An image of"
NEW_TOKENS = 64


def measure(weights: Path, sizes: list[int], repeat: int) -> dict:
    """In this process (the tree under test first on sys.path): latency and throughput."""
    import torch
    from common import synthetic_image

    from kosmos2_cli import Kosmos2ForConditionalGeneration, Kosmos2Processor

    model = Kosmos2ForConditionalGeneration.from_pretrained(weights, device="cuda", dtype=torch.bfloat16)
    if not _fast_by_default(model):
        model.fuse_for_inference()  # the old tree's benchmark path
    processor = Kosmos2Processor.from_pretrained(weights)
    one = processor(text=PROMPT, images=synthetic_image(), return_tensors="pt").to("cuda")
    out = {}
    for n in sizes:
        batch = {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in one.items()}
        times = []
        for i in range(repeat + 2):  # two warm-ups: the first call captures graphs
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.no_grad():
                model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        out[str(n)] = {"s_per_generate": seconds, "images_per_s": n / seconds}
    return out


def _fast_by_default(model) -> bool:
    try:
        from kosmos2_cli.fast.modules import FastAttention
    except ImportError:
        return False
    return isinstance(model.text_model.model.layers[0].self_attn, FastAttention)


def first_token(weights: Path) -> float:
    """In this (new) process: import, from_pretrained, the first generated token."""
    start = time.perf_counter()
    import torch

    from kosmos2_cli import Kosmos2ForConditionalGeneration, Kosmos2Processor

    processor = Kosmos2Processor.from_pretrained(weights)
    from common import synthetic_image

    inputs = processor(text=PROMPT, images=synthetic_image(), return_tensors="pt")
    model = Kosmos2ForConditionalGeneration.from_pretrained(weights, device="cuda", dtype=torch.bfloat16)
    if not _fast_by_default(model):
        model.fuse_for_inference()
    with torch.no_grad():
        model.generate(**inputs.to("cuda"), max_new_tokens=1)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _child(tree: str, *args: str) -> str:
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, str(here), str(here.parent / "tests")])}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--trees", nargs="+", default=["new=src"], help="NAME=SRC_DIR ...")
    parser.add_argument("--sizes", default="1,256,512")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the trees")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=["measure", "first-token"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "measure":
        print(json.dumps(measure(args.weights, [int(s) for s in args.sizes.split(",")], args.repeat)))
        return
    if args.child == "first-token":
        print(json.dumps(first_token(args.weights)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import full_size_checkpoint, warm_file_cache

    full_size_checkpoint(args.weights)
    warm_file_cache(args.weights)
    trees = dict(tree.split("=", 1) for tree in args.trees)
    results: dict = {name: {"runs": [], "loads": []} for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            common = ["--weights", str(args.weights), "--sizes", args.sizes, "--repeat", str(args.repeat)]
            results[name]["runs"].append(json.loads(_child(tree, "--child", "measure", *common)))
            for _ in range(args.loads):
                results[name]["loads"].append(json.loads(_child(tree, "--child", "first-token", *common)))
            print(name, results[name]["runs"][-1], results[name]["loads"][-args.loads:], flush=True)
    import torch

    card = torch.cuda.get_device_name()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ab.json").write_text(json.dumps({"card": card, **results}, indent=1))
    names = list(trees)
    print(f"\nA/B on {card} (bf16, {NEW_TOKENS} tokens forced; medians over {args.rounds} alternating rounds)")
    print(f"{'measure':<28}" + "".join(f"{n:>12}" for n in names) + ("   ratio (last/first)" if len(names) > 1
                                                                      else ""))
    rows = []
    for size in args.sizes.split(","):
        key = "s at batch 1" if size == "1" else f"images/s at {size}"
        field = "s_per_generate" if size == "1" else "images_per_s"
        rows.append((key, [statistics.median(run[size][field] for run in results[n]["runs"]) for n in names]))
    rows.append(("load to first token, s", [statistics.median(results[n]["loads"]) for n in names]))
    for key, values in rows:
        ratio = f"   {values[-1] / values[0]:.3f}" if len(values) > 1 else ""
        print(f"{key:<28}" + "".join(f"{v:>12.3f}" for v in values) + ratio)


if __name__ == "__main__":
    main()
