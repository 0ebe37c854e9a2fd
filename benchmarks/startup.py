"""Where a new process's time goes before its first token on the GPU, phase by phase, and how fast the loader
reads the checkpoint with 1-16 threads.

`PYTHONPATH=src python benchmarks/startup.py --weights DIR [--reads]` (CUDA only; DIR: a full-size checkpoint,
e.g. the one benchmarks/gpu.py builds). Run it twice: the first run also fills Triton's kernel cache.

`--batch N`: `kosmos2 batch` over N generated 640x480 JPEGs, phase by phase (the package's start-up marks,
KOSMOS2_MARKS), twice in new processes: first with an empty Triton cache (a machine that never ran it; Python's
bytecode compiled, as a pip install leaves it), then again (a machine that has). Prints, for each run, when each
phase was reached, the first record, the wall clock and the steady rate.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

T0 = time.perf_counter()
MARKS: list[tuple[str, float]] = []


def mark(name: str) -> None:
    import sys

    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
    MARKS.append((name, time.perf_counter()))


def phases() -> None:
    import torch

    mark("import torch")
    from kosmos2_cli import Kosmos2ForConditionalGeneration, Kosmos2Processor

    mark("import kosmos2_cli")
    from common import synthetic_image

    processor = Kosmos2Processor.from_pretrained(ARGS.weights)
    inputs = processor(text="<grounding> An image of", images=synthetic_image(), return_tensors="pt")
    mark("processor + inputs")
    if ARGS.context_first:
        torch.cuda.init()
        torch.empty(1, device="cuda")
        mark("CUDA context")
    model = Kosmos2ForConditionalGeneration.from_pretrained(ARGS.weights, device="cuda", dtype=torch.bfloat16)
    mark("from_pretrained (fast path on)")
    inputs = inputs.to("cuda")
    mark("inputs to GPU")
    with torch.no_grad():
        model.get_image_features(inputs["pixel_values"].to(torch.bfloat16))
        mark("first image encoding")
        model.get_image_features(inputs["pixel_values"].to(torch.bfloat16))
        mark("second image encoding")
        model.generate(**inputs, max_new_tokens=1)
        mark("first generate (1 token)")
        model.generate(**inputs, max_new_tokens=1)
        mark("second generate (1 token)")
        model.generate(**inputs, max_new_tokens=2)
        mark("generate 2 tokens (decode graph capture)")
        model.generate(**inputs, max_new_tokens=2)
        mark("generate 2 tokens again")


def micro() -> None:
    """Each library's first call in a new process, one at a time."""
    import torch
    import torch.nn.functional as F

    mark("import torch")
    torch.empty(1, device="cuda")
    mark("CUDA context")
    bf = dict(device="cuda", dtype=torch.bfloat16)
    a, b = torch.randn(71, 2048, **bf), torch.randn(2048, 2048, **bf)
    mark("randn")
    torch.mm(a, b)
    mark("first cuBLAS mm")
    F.linear(a, b, torch.randn(2048, **bf))
    mark("first F.linear with bias")
    F.conv2d(torch.randn(1, 3, 224, 224, **bf), torch.randn(1024, 3, 14, 14, **bf), stride=14)
    mark("first conv2d (cuDNN)")
    q = torch.randn(1, 16, 257, 64, **bf)
    F.scaled_dot_product_attention(q, q, q)
    mark("first SDPA")
    q = torch.randn(1, 32, 71, 64, **bf)
    F.scaled_dot_product_attention(q, q, q, is_causal=True)
    mark("first causal SDPA")
    import triton  # noqa: F401

    mark("import triton")
    from kosmos2_cli.fast import kernels

    mark("import kernels")
    kernels.layer_norm(a, b[0], b[1], 1e-5)
    mark("first Triton LayerNorm")
    kernels.linear_row(a[:1], b, None)
    mark("first one-row product")


def evict(path: Path) -> None:
    import os

    with open(path, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def reads() -> dict:
    import torch

    from kosmos2_cli.model.safetensors_mmap import MappedSafetensors
    from kosmos2_cli.model.staging import Span, _stream_read, stream_spans

    path = ARGS.weights / "model.safetensors"
    mapped = MappedSafetensors(path)
    spans = [Span(key, path, *mapped.span(key)) for key in mapped.keys()]
    total = sum(span.nbytes for span in spans)
    torch.empty(1, device="cuda")
    out = {}

    def timed(name: str, stream) -> None:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _, tensor in stream:
            del tensor
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        out[name] = {"s": seconds, "GB/s": total / seconds / 1e9}
        print("read", name, out[name], flush=True)

    for _ in range(2):
        timed("page cache registered with CUDA (stream_spans)", stream_spans(spans, torch.device("cuda")))
    for _ in range(2):  # a cold page cache: the file's pages dropped first (clean pages need no privileges)
        evict(path)
        timed("cold: registered with CUDA (stream_spans)", stream_spans(spans, torch.device("cuda")))
        evict(path)
        timed("cold: preads, 16 threads, 8 MB", _stream_read(spans, torch.device("cuda")))
    for threads in (1, 4, 8, 16):
        for chunk_mb in (8, 16, 32):
            timed(f"preads: {threads} threads, {chunk_mb} MB",
                  _stream_read(spans, torch.device("cuda"), chunk=chunk_mb << 20, threads=threads))
    start = time.perf_counter()
    for key in mapped.keys():
        mapped.tensor(key).to("cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    out["memory map, .to(cuda)"] = {"s": seconds, "GB/s": total / seconds / 1e9}
    print("read mmap", out["memory map, .to(cuda)"], flush=True)
    return out


def batch_startup(count: int) -> dict:
    """Two `kosmos2 batch` runs over `count` JPEGs (fresh Triton cache, then warm): marks, first record, rates."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from gpu import NEW_TOKENS, fill_bytecode_cache, make_jpegs, subprocess_env

    work = ARGS.weights.parent
    images = work / f"kosmos2-e2e-{count}"
    make_jpegs(images, count)
    fill_bytecode_cache(work, {})
    triton = Path(tempfile.mkdtemp(prefix="triton-fresh-"))
    out: dict = {"images": count}
    for run in ("fresh", "warm"):
        records = work / "startup-batch.jsonl"
        marks = work / f"startup-marks-{run}.jsonl"
        records.unlink(missing_ok=True)
        marks.unlink(missing_ok=True)
        env = {**subprocess_env(work), "TRITON_CACHE_DIR": str(triton), "KOSMOS2_MARKS": str(marks)}
        env.update(ARGS.env)
        command = [sys.executable, "-m", "kosmos2_cli", "batch", str(images), "-o", str(records), "--model",
                   str(ARGS.weights), "--max-new-tokens", str(NEW_TOKENS), "--json", "--quiet"]
        t0 = time.time()
        env["KOSMOS2_T0"] = repr(t0)
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        progress = []
        while child.poll() is None:
            time.sleep(0.05)
            if records.exists():
                progress.append((time.time() - t0, records.read_bytes().count(b"\n")))
        wall = time.time() - t0
        _, stderr = child.communicate()
        done = records.read_text().count("\n") if records.exists() else 0

        def at(n: int, progress=progress) -> float:
            return next(t for t, k in progress if k >= max(1, n))

        phases = [json.loads(line) for line in marks.read_text().splitlines()] if marks.exists() else []
        out[run] = {"exit": child.returncode, "records": done, "wall_s": round(wall, 3),
                    "images_per_s_wall": round(done / wall, 1), "first_record_s": round(at(1), 3),
                    "images_per_s_steady": round(0.8 * count / (at(int(0.9 * count)) - at(int(0.1 * count))), 1),
                    "marks": phases, "stderr": stderr[-1500:] if child.returncode else ""}
        print(f"\n{run}: first record {out[run]['first_record_s']} s, wall {wall:.2f} s "
              f"({out[run]['images_per_s_wall']} images/s), steady {out[run]['images_per_s_steady']} images/s",
              flush=True)
        for line in phases:
            detail = f"  ({line['detail']})" if "detail" in line else ""
            print(f"  {line['s']:8.3f} s  {line['phase']}{detail}  [{line['thread']}]")
    shutil.rmtree(triton, ignore_errors=True)
    os.environ.pop("KOSMOS2_MARKS", None)
    return out


def main() -> None:
    if ARGS.batch:
        result = {"batch": batch_startup(ARGS.batch)}
    elif ARGS.reads:
        result = {"reads": reads()}
    else:
        micro() if ARGS.micro else phases()
        previous = T0
        result = {}
        for name, at in MARKS:
            result[name] = round(at - previous, 4)
            previous = at
        result["total"] = round(MARKS[-1][1] - T0, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--reads", action="store_true", help="time the checkpoint reader instead")
    parser.add_argument("--micro", action="store_true", help="first calls of each library, one at a time")
    parser.add_argument("--context-first", action="store_true", help="create the CUDA context before loading")
    parser.add_argument("--batch", type=int, default=0, metavar="N", help="kosmos2 batch start-up over N JPEGs")
    parser.add_argument("--env", nargs="*", default=[], metavar="NAME=VALUE", help="for --batch's processes")
    ARGS = parser.parse_args()
    ARGS.env = dict(item.split("=", 1) for item in ARGS.env)
    main()
