"""CPU benchmark: a 64-token caption on full-size random weights, ours (fp32, bf16, int8) beside the reference.

    PYTHONPATH=src python benchmarks/cpu.py                  # all configurations (~10 minutes on 2 cores)
    PYTHONPATH=src python benchmarks/cpu.py --configs ours-int8,reference-fp32 --runs 5 --out results/

The weights are the GPU benchmark's (common.full_size_checkpoint: the reference's own random initialisation of
the released architecture, seed 0, 6.6 GB of fp32 safetensors, built once). Each configuration runs in its own
subprocess, so its peak resident memory (VmHWM, taken after loading and one caption) is its own: load, one
cold caption, the first step's logits (through the KV cache, as generate's first step),
then `--runs` timed captions of exactly 64 new tokens (EOS forbidden until then: `min_new_tokens`) and `--runs`
timed encode+prefill passes (one new token); medians. Per token = (caption - encode+prefill) / 63. Threads:
torch's default (the physical cores). Needs transformers (the reference; a test dependency).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, dump, full_size_checkpoint, synthetic_image, warm_file_cache

CONFIGS = ("reference-fp32", "reference-bf16", "ours-fp32", "ours-bf16", "ours-int8")
PROMPT = "<grounding> An image of"


def peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (the tied head is one table)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def load(config: str, folder: Path):
    import torch

    side, dtype = config.split("-")
    if side == "reference":
        from transformers import Kosmos2ForConditionalGeneration

        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        return Kosmos2ForConditionalGeneration.from_pretrained(str(folder), dtype=torch_dtype).eval()
    from kosmos2_cli import Kosmos2ForConditionalGeneration

    model = Kosmos2ForConditionalGeneration.from_pretrained(folder, device="cpu", dtype=dtype)
    return model


def worker(config: str, folder: Path, work: Path, runs: int, new_tokens: int) -> dict:
    """Load one configuration and time it; the first step's logits go to `work`."""
    import torch

    inputs = torch.load(work / "inputs.pt")
    start = time.perf_counter()
    model = load(config, folder)
    load_s = time.perf_counter() - start
    pixels = inputs["pixel_values"].to(torch.bfloat16 if config == "reference-bf16" else torch.float32)
    prompt_len = inputs["input_ids"].shape[1]
    args = dict(pixel_values=pixels, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                image_embeds_position_mask=inputs["image_embeds_position_mask"])

    def generate(count: int) -> float:
        begin = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**args, image_embeds=None, use_cache=True, max_new_tokens=count,
                                 min_new_tokens=count, do_sample=False, num_beams=1)
        elapsed = time.perf_counter() - begin
        if out.shape[1] != prompt_len + count:
            raise RuntimeError(f"{config}: generated {out.shape[1] - prompt_len} tokens, not {count}")
        return elapsed

    first_caption_s = generate(new_tokens)
    peak_rss = peak_rss_bytes()  # what loading and one caption take; the timing runs below add nothing of use
    with torch.no_grad():
        logits = model(**args, use_cache=True).logits  # as generate's first step (through the cache)
    torch.save(logits[0, -1].float().clone(), work / f"logits-{config}.pt")
    prefill = statistics.median(generate(1) for _ in range(runs))
    caption = statistics.median(generate(new_tokens) for _ in range(runs))
    return {
        "config": config, "threads": torch.get_num_threads(), "load_s": load_s, "encode_prefill_s": prefill,
        "per_token_s": (caption - prefill) / (new_tokens - 1), "caption_s": caption,
        "first_caption_s": first_caption_s, "peak_rss_bytes": peak_rss, "weight_bytes": weight_bytes(model),
    }


def cpu_description() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"{os.cpu_count()} CPUs"
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    flags = f" {fields.get('Flags', '')} "
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f" {f} " in flags]
    return f"{fields.get('Model name', 'unknown CPU')}, {fields.get('CPU(s)', os.cpu_count())} CPUs ({', '.join(isa)})"


def table(results: list[dict], new_tokens: int) -> str:
    base = next((r for r in results if r["config"] == "reference-fp32"), None)
    lines = [
        f"| configuration | load s | encode + prefill s | per token ms | {new_tokens}-token caption s | speed-up vs "
        "reference fp32 | first (cold) caption s | peak RSS GB | weights GB | peak RSS / weights | first-step "
        "logits rel. error vs reference fp32 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        speedup = f"{base['caption_s'] / r['caption_s']:.2f}x" if base else "-"
        error = f"{r['logits_rel_err']:.2e}" if r.get("logits_rel_err") is not None else "-"
        lines.append(
            f"| {r['config']} | {r['load_s']:.1f} | {r['encode_prefill_s']:.2f} | {r['per_token_s'] * 1e3:.0f} | "
            f"{r['caption_s']:.2f} | {speedup} | {r['first_caption_s']:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} | "
            f"{r['weight_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / r['weight_bytes']:.2f} | {error} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kosmos2-full")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None, help="folder for cpu-results.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(worker(args.worker, args.weights, args.work, args.runs, args.new_tokens)))
        return

    import torch

    from kosmos2_cli import Kosmos2Processor

    folder = full_size_checkpoint(args.weights)
    warm_file_cache(folder)  # every configuration loads from a warm page cache
    work = Path(tempfile.mkdtemp(prefix="kosmos2-cpu-bench-"))
    inputs = Kosmos2Processor.from_pretrained(folder)(text=PROMPT, images=synthetic_image(), return_tensors="pt")
    torch.save(dict(inputs), work / "inputs.pt")

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    load_before = os.getloadavg()
    results = []
    for config in args.configs.split(","):
        if config not in CONFIGS:
            sys.exit(f"unknown configuration {config!r} (choose from {', '.join(CONFIGS)})")
        print(f"running {config} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--worker", config, "--weights", str(folder), "--work", str(work),
                   "--runs", str(args.runs), "--new-tokens", str(args.new_tokens)]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{config} failed:\n{done.stderr}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  caption {results[-1]['caption_s']:.2f} s, peak RSS {results[-1]['peak_rss_bytes'] / 1e9:.2f} GB",
              file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    reference = work / "logits-reference-fp32.pt"
    if reference.exists():
        want = torch.load(reference)
        for r in results:
            got = torch.load(work / f"logits-{r['config']}.pt")
            r["logits_rel_err"] = float((got - want).norm() / want.norm())

    details = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_description(), "torch": torch.__version__,
        "threads": results[0]["threads"], "load_average_before": load_before[0], "load_average_after": load_after[0],
        "runs": args.runs, "new_tokens": args.new_tokens, "prompt": PROMPT,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        dump(args.out / "cpu-results.json", {**details, "results": results})
    print(f"\n{details['date']}, {details['cpu']}, torch {details['torch']}, {details['threads']} threads, "
          f"1-minute load average {load_before[0]:.2f} before / {load_after[0]:.2f} after, median of {args.runs}\n")
    print(table(results, args.new_tokens))


if __name__ == "__main__":
    main()
