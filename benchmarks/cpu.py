"""CPU benchmark: a 64-token caption on full-size random weights, ours (fp32, bf16, int8) beside the reference.

    PYTHONPATH=src python benchmarks/cpu.py                 # prints the table
    PYTHONPATH=src python benchmarks/cpu.py --write benchmarks/RESULTS.md

One set of full-size random weights (the reference's `Kosmos2ForConditionalGeneration(Kosmos2Config())`, seed 0,
saved in the hub layout, 6.6 GB) is built once and cached (default /tmp/kosmos2-cpu-bench). Every
configuration runs in its own subprocess, so its peak resident memory (VmHWM) is its own. Each one: load,
one cold caption, the first step's logits, then `--runs` timed captions of exactly 64 new tokens (EOS is
forbidden until then, `min_new_tokens`) and `--runs` timed encode+prefill passes (1 new token); medians.
Per token = (caption - encode+prefill) / 63. Needs transformers (the reference; a test dependency).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("reference-fp32", "reference-bf16", "ours-fp32", "ours-bf16", "ours-int8")
PROMPT = "<grounding> An image of"


def build_checkpoint(folder: Path) -> None:
    """Full-size random weights in the hub layout (made once; `.complete` marks a finished folder)."""
    if (folder / ".complete").is_file():
        return
    import torch
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    sys.path.insert(0, str(ROOT / "tests"))
    from oracle import write_tokenizer_files

    print(f"building full-size random weights in {folder} (once) ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    model = Kosmos2ForConditionalGeneration(Kosmos2Config()).eval()
    model.save_pretrained(str(folder))
    write_tokenizer_files(folder)
    (folder / ".complete").write_text("seed 0\n")


def build_inputs(folder: Path) -> Path:
    """The processor's tensors for one picture (a demo image when ../shared is there), shared by all runs."""
    import torch
    from PIL import Image

    path = folder / "inputs.pt"
    if path.is_file():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    from oracle import IMAGES

    from kosmos2_cli import Kosmos2Processor

    if (IMAGES / "snowman.png").is_file():
        image = Image.open(IMAGES / "snowman.png").convert("RGB")
    else:
        generator = torch.Generator().manual_seed(0)
        image = Image.fromarray(torch.randint(0, 256, (480, 640, 3), generator=generator, dtype=torch.uint8).numpy())
    inputs = Kosmos2Processor.from_pretrained(folder)(text=PROMPT, images=image, return_tensors="pt")
    torch.save({k: v for k, v in inputs.items()}, path)
    return path


def peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def worker(config: str, folder: Path, runs: int, new_tokens: int, logits_path: Path) -> dict:
    """Load one configuration and time it; returns the measurements (logits go to `logits_path`)."""
    import torch

    side, dtype = config.split("-")
    inputs = torch.load(folder / "inputs.pt")
    start = time.perf_counter()
    if side == "reference":
        from transformers import Kosmos2ForConditionalGeneration

        torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        model = Kosmos2ForConditionalGeneration.from_pretrained(str(folder), dtype=torch_dtype).eval()
    else:
        from kosmos2_cli import Kosmos2ForConditionalGeneration

        model = Kosmos2ForConditionalGeneration.from_pretrained(folder, device="cpu", dtype=dtype)
    load_s = time.perf_counter() - start
    pixels = inputs["pixel_values"].to(torch.bfloat16 if config == "reference-bf16" else torch.float32)
    prompt_len = inputs["input_ids"].shape[1]

    def generate(count: int) -> float:
        begin = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                pixel_values=pixels, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                image_embeds=None, image_embeds_position_mask=inputs["image_embeds_position_mask"], use_cache=True,
                max_new_tokens=count, min_new_tokens=count, do_sample=False, num_beams=1,
            )
        elapsed = time.perf_counter() - begin
        if out.shape[1] != prompt_len + count:
            raise RuntimeError(f"{config}: generated {out.shape[1] - prompt_len} tokens, not {count}")
        return elapsed

    first_caption_s = generate(new_tokens)
    with torch.no_grad():
        logits = model(pixel_values=pixels, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       image_embeds_position_mask=inputs["image_embeds_position_mask"], use_cache=False).logits
    torch.save(logits[0, -1].float(), logits_path)
    prefill = statistics.median(generate(1) for _ in range(runs))
    caption = statistics.median(generate(new_tokens) for _ in range(runs))
    return {
        "config": config, "threads": torch.get_num_threads(), "load_s": load_s, "encode_prefill_s": prefill,
        "per_token_s": (caption - prefill) / (new_tokens - 1), "caption_s": caption,
        "first_caption_s": first_caption_s, "peak_rss": peak_rss_bytes(), "weight_bytes": weight_bytes(model),
    }


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    flags = fields.get("Flags", "")
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f" {f}" in f" {flags}"]
    return f"{name}, {os.cpu_count()} CPUs ({', '.join(isa)})"


def table(results: list[dict], new_tokens: int) -> str:
    import torch

    by_name = {r["config"]: r for r in results}
    base = by_name.get("reference-fp32")
    ref_logits = torch.load(base["logits"]) if base else None
    lines = [
        f"| configuration | load s | encode+prefill s | per token ms | {new_tokens}-token caption s | speed-up vs "
        "reference fp32 | first (cold) caption s | peak RSS GB | weights GB | RSS / weights | first-step logits "
        "rel. error vs reference fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        speedup = f"{base['caption_s'] / r['caption_s']:.2f}x" if base else "-"
        error = "-"
        if ref_logits is not None:
            logits = torch.load(r["logits"])
            error = f"{float((logits - ref_logits).norm() / ref_logits.norm()):.2e}"
        lines.append(
            f"| {r['config']} | {r['load_s']:.1f} | {r['encode_prefill_s']:.2f} | {r['per_token_s'] * 1e3:.0f} | "
            f"{r['caption_s']:.2f} | {speedup} | {r['first_caption_s']:.2f} | {r['peak_rss'] / 1e9:.2f} | "
            f"{r['weight_bytes'] / 1e9:.2f} | {r['peak_rss'] / r['weight_bytes']:.2f} | {error} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/kosmos2-cpu-bench"),
                        help="folder for the random full-size checkpoint (6.6 GB, made once)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--write", type=Path, help="append the table, with the machine's details, to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--logits", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = args.cache / "full-seed0"

    if args.worker:
        print(json.dumps(worker(args.worker, folder, args.runs, args.new_tokens, args.logits)))
        return

    build_checkpoint(folder)
    build_inputs(folder)
    load_before = os.getloadavg()
    results = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                      os.environ.get("PYTHONPATH")]))}
    for config in args.configs.split(","):
        logits = args.cache / f"logits-{config}.pt"
        command = [sys.executable, __file__, "--worker", config, "--cache", str(args.cache), "--runs",
                   str(args.runs), "--new-tokens", str(args.new_tokens), "--logits", str(logits)]
        print(f"running {config} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"{config} failed:\n{done.stderr}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        result["logits"] = str(logits)
        results.append(result)
        print(f"  {config}: caption {result['caption_s']:.2f} s, peak RSS {result['peak_rss'] / 1e9:.2f} GB",
              file=sys.stderr, flush=True)
    load_after = os.getloadavg()

    import torch

    report = table(results, args.new_tokens)
    details = (
        f"{datetime.date.today().isoformat()}, {cpu_model()}, torch {torch.__version__}, "
        f"{results[0]['threads']} threads, load average {load_before[0]:.2f} before / {load_after[0]:.2f} after, "
        f"median of {args.runs} runs, prompt `{PROMPT}`"
    )
    print(f"{details}\n\n{report}")
    if args.write:
        with args.write.open("a", encoding="utf-8") as out:
            out.write(f"\n### {details}\n\n{report}\n")


if __name__ == "__main__":
    main()
