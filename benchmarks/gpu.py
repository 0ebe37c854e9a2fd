"""GPU benchmark: ours beside the reference (transformers' Kosmos-2) on one set of full-size random weights.

    python benchmarks/gpu.py --out results/          # full run (about 5 minutes on an H100)
    python benchmarks/gpu.py --quick                 # fewer sizes and repeats

Prints one table: latency at batch 1, throughput per batch size, load time, peak memory, fidelity of the first
step's logits, each with the ratio to the reference. Prompts are "<grounding> An image of" with 64 new tokens
forced (EOS suppressed), bf16, as the anchor in the issue was measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
from common import dump, full_size_checkpoint, median_time, synthetic_image, warm_file_cache
from PIL import Image

PROMPT = "<grounding> An image of"
NEW_TOKENS = 64


def load_to_first_token(which: str, folder: Path) -> dict:
    """Seconds from nothing loaded to the first generated token, in this (fresh) process, by phase: importing
    the library, `from_pretrained`, and the first token (CUDA and kernel start-up, graph capture)."""
    t0 = time.perf_counter()
    from kosmos2_cli import Kosmos2Processor  # the same inputs for both (what is timed is the model's load)

    if which == "ours":
        from kosmos2_cli import Kosmos2ForConditionalGeneration as Model
    else:
        from transformers import Kosmos2ForConditionalGeneration as Model
    processor = Kosmos2Processor.from_pretrained(folder)
    inputs = processor(text=PROMPT, images=synthetic_image(), return_tensors="pt")
    t1 = time.perf_counter()
    # Ours as a script uses it: from_pretrained, then generate (the fast path is on by default).
    model = Model.from_pretrained(str(folder), dtype=torch.bfloat16, device_map="cuda") if which == "ref" else (
        Model.from_pretrained(folder, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs.to("cuda"), max_new_tokens=1)
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    return {"load_to_first_token_s": t3 - t0, "import_s": t1 - t0, "from_pretrained_s": t2 - t1,
            "first_token_s": t3 - t2}


def make_jpegs(folder: Path, count: int) -> None:
    """`count` 640x480 JPEGs of smooth random colour fields (photo-like sizes, ~30-60 KB), made once."""
    import numpy as np

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return
    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        rng = np.random.default_rng(i)
        small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        noisy = np.asarray(small, dtype=np.int16) + rng.integers(-12, 13, (480, 640, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.jpg", quality=90)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))


def sync() -> None:
    torch.cuda.synchronize()


def subprocess_env(folder: Path) -> dict:
    """The environment of the benchmark's new processes: Python's bytecode cache on, under `folder`.

    A pip-installed torch comes with its modules compiled; the GPU machine's image ships none and sets
    PYTHONDONTWRITEBYTECODE, so each process compiled torch's sources again (3.3 s of `import torch`). The
    first process fills the cache (`fill_bytecode_cache`), as a user's first run does.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(folder / "kosmos2-pycache")}


def fill_bytecode_cache(folder: Path, results: dict) -> None:
    """Import what the timed processes import, once a run; records how long a second import of torch takes."""
    if "import_torch_s_with_bytecode_cache" in results:
        return
    modules = "torch, triton, transformers, kosmos2_cli.cli.app, kosmos2_cli.model.kosmos2, kosmos2_cli.fast.kernels"
    code = f"import importlib\nfor m in '{modules}'.split(', '):\n    try: importlib.import_module(m)\n" \
           "    except Exception: pass\nfrom transformers import Kosmos2ForConditionalGeneration"
    subprocess.run([sys.executable, "-c", code], env=subprocess_env(folder), capture_output=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], env=subprocess_env(folder), check=True)
    results["import_torch_s_with_bytecode_cache"] = time.perf_counter() - start


def section(name: str, results: dict, fn) -> None:
    """Run one part of the benchmark; a failure is reported and the rest goes on."""
    start = time.perf_counter()
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the benchmark reports every failure and carries on
        results.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    print(f"[{name}] {time.perf_counter() - start:.1f}s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "kosmos2-full")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated, ours")
    parser.add_argument("--ref-batch-sizes", default=None, help="comma-separated, the reference")
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument("--e2e", type=int, default=0, metavar="N",
                        help="also time `kosmos2 batch` over N generated 640x480 JPEGs")
    parser.add_argument("--batch-size-e2e", type=int, default=256)
    parser.add_argument("--e2e-profile", action="store_true", help="run the end-to-end batch under cProfile")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end batch (with --e2e N)")
    parser.add_argument("--load-only", choices=["ours", "ref"], help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="kernel profile of a decode step, GEMV bandwidth, "
                        "and a torch.compile trial")
    args = parser.parse_args()

    if args.load_only:
        print(json.dumps(load_to_first_token(args.load_only, args.weights)))
        return

    from kosmos2_cli import Kosmos2ForConditionalGeneration, Kosmos2Processor

    device = torch.device("cuda")
    dtype = torch.bfloat16
    torch.backends.cuda.matmul.allow_tf32 = True
    results: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    ours_sizes = [int(x) for x in (args.batch_sizes or ("1,8,64,256" if args.quick else
                                                        "1,8,32,64,128,256,512,1024")).split(",")]
    ref_sizes = [int(x) for x in (args.ref_batch_sizes or ("1,64" if args.quick else
                                                           "1,32,128,512,1024")).split(",")]
    repeat = 2 if args.quick else 3

    start = time.perf_counter()
    folder = full_size_checkpoint(args.weights)
    results["build_weights_s"] = time.perf_counter() - start
    warm_file_cache(folder)
    processor = Kosmos2Processor.from_pretrained(folder)
    one = processor(text=PROMPT, images=synthetic_image(), return_tensors="pt").to(device)

    def batch_of(n: int) -> dict:
        return {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in one.items()}

    state: dict = {}

    def load_ours():
        sync()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        # The script path: what a transformers user writes, no other call (the fast path is on by default).
        model = Kosmos2ForConditionalGeneration.from_pretrained(folder, device=device, dtype=dtype)
        sync()
        t1 = time.perf_counter()
        model.generate(**one, max_new_tokens=1)
        sync()
        results["ours_load_to_first_token_s"] = time.perf_counter() - t0
        results["ours_load_phases_s"] = {"from_pretrained": t1 - t0, "first_token": time.perf_counter() - t1}
        from kosmos2_cli.fast.modules import FastAttention

        results["ours_script_path_is_fast"] = isinstance(model.text_model.model.layers[0].self_attn, FastAttention)
        results["ours_weights_gb"] = torch.cuda.max_memory_allocated() / 1e9
        state["ours"] = model

    def load_reference():
        from transformers import Kosmos2ForConditionalGeneration as Reference

        sync()
        t0 = time.perf_counter()
        model = Reference.from_pretrained(str(folder), dtype=dtype, attn_implementation="sdpa").to(device).eval()
        state["ref_causal_resampler"] = bool(getattr(model.image_to_text_projection.x_attn, "is_causal", False))
        with torch.no_grad():
            model.generate(**one, max_new_tokens=1, do_sample=False)
        sync()
        results["ref_load_to_first_token_s"] = time.perf_counter() - t0
        state["ref"] = model

    def fidelity():
        from transformers import Kosmos2ForConditionalGeneration as Reference

        ours, ref = state["ours"], state["ref"]
        full = Reference.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
        # transformers <= 5.17 hard-codes is_causal=True in KosmosTextAttention, so under SDPA its resampler
        # (64 latent queries over the image features) runs with a causal mask: not the released model's maths.
        # Later versions (5.24, CI's oracle) take is_causal=False there; compare against that behaviour.
        results["reference_resampler_was_causal"] = state.get("ref_causal_resampler", False)
        for model in (ref, full):
            model.image_to_text_projection.x_attn.is_causal = False
        with torch.no_grad():
            truth = full(**one).logits[0, -1].float()
            ours_logits = ours(**one).logits[0, -1].float()
            ref_logits = ref(**one).logits[0, -1].float()
            rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
            results["first_step_rel_err_ours_bf16_vs_ref_fp32"] = rel(ours_logits, truth)
            results["first_step_rel_err_ref_bf16_vs_ref_fp32"] = rel(ref_logits, truth)
            results["first_step_rel_err_ours_bf16_vs_ref_bf16"] = rel(ours_logits, ref_logits)
            out = ref.generate(**one, max_new_tokens=32, do_sample=False, output_scores=True,
                               return_dict_in_generate=True)
            mine = ours.generate(**one, max_new_tokens=32)
        scores = torch.stack(out.scores, 1)[0].float()
        top2 = scores.topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).tolist()
        theirs = out.sequences[0, one["input_ids"].shape[1]:].tolist()
        new = mine[0, one["input_ids"].shape[1]:].tolist()
        agree = next((i for i, (a, b) in enumerate(zip(theirs, new, strict=False)) if a != b), min(len(theirs),
                                                                                                 len(new)))
        clear = next((i for i, m in enumerate(margin) if m < 0.05), len(margin))
        results["greedy_agree_tokens"] = agree
        results["greedy_clear_margin_tokens"] = clear
        results["greedy_margins_first8"] = [round(m, 3) for m in margin[:8]]
        if results["reference_resampler_was_causal"]:
            ref.image_to_text_projection.x_attn.is_causal = True  # time the reference as shipped
        del full
        gc.collect()
        torch.cuda.empty_cache()

    def latency_and_throughput(name: str, sizes: list[int]):
        model = state[name]
        kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        if name == "ref":
            kwargs["do_sample"] = False
        rows = {}
        # Peak memory of this model alone: its weights plus what a batch adds to what was resident before (the
        # other model and earlier batch sizes' caches stay out of its count).
        weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        for n in sizes:
            inputs = batch_of(n)
            if hasattr(model, "workspace"):
                model.workspace.clear()  # ours keeps two shapes' caches: not the last size's
            try:
                with torch.no_grad():
                    gc.collect()
                    torch.cuda.synchronize()
                    resident = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    model.generate(**inputs, **kwargs)  # warm-up (graph capture, autotune, allocator)
                    seconds = median_time(lambda batch=inputs: model.generate(**batch, **kwargs), repeat, sync)
            except torch.cuda.OutOfMemoryError:
                rows[n] = {"oom": True}
                torch.cuda.empty_cache()
                break
            rows[n] = {"s_per_generate": seconds, "images_per_s": n / seconds,
                       "tokens_per_s": n * NEW_TOKENS / seconds,
                       "peak_gb": (weights + torch.cuda.max_memory_allocated() - resident) / 1e9}
            print(name, n, rows[n], flush=True)
        results[f"{name}_batches"] = rows

    @torch.no_grad()
    def prefilled(n: int):
        """(model, pixel values, decoder, prefill arguments) for batch n, with the prompt prefilled once."""
        from kosmos2_cli.generation.generate import Decoder

        model, inputs = state["ours"], batch_of(n)
        ids = inputs["input_ids"]
        embeds = model.get_image_features(inputs["pixel_values"])
        decoder = Decoder.for_model(model, n, ids.shape[1] + NEW_TOKENS, device)
        prompt = (ids, inputs["attention_mask"].bool(), embeds, inputs["image_embeds_position_mask"])
        decoder.prefill(*prompt)
        return model, inputs["pixel_values"], decoder, prompt

    def step_ms(decoder, prompt, step) -> float:
        """Milliseconds per decode `step`: 32 steps after a fresh prefill, the median of three such runs."""
        times = []
        for _ in range(3):
            decoder.prefill(*prompt)
            times.append(median_time(lambda: [step() for _ in range(32)], 1, sync) / 32)
        return sorted(times)[1] * 1e3

    def breakdown(n: int):
        """Where one generate() goes: image encoder, prefill, and one decode step (graph replay + argmax)."""
        model, pixels, decoder, prompt = prefilled(n)
        with torch.no_grad():
            vision = median_time(lambda: model.get_image_features(pixels), 5, sync)
            prefill = median_time(lambda: decoder.prefill(*prompt), 5, sync)
            token = torch.full((n,), 5, dtype=torch.long, device=device)
            decoder.step(token)  # capture
            step = step_ms(decoder, prompt, lambda: decoder.step(token).argmax(dim=-1))
        row = {"vision_ms": vision * 1e3, "prefill_ms": prefill * 1e3, "step_ms": step}
        results.setdefault("ours_breakdown", {})[n] = row
        print("breakdown", n, row, flush=True)

    def finished_rows(n: int):
        """A decode step when part of the batch has finished (real captions end at different lengths; these
        random weights never do): the finished rows' attention is skipped."""
        model, pixels, decoder, prompt = prefilled(n)
        token = torch.full((n,), 5, dtype=torch.long, device=device)
        row = {}
        with torch.no_grad():
            for fraction in (0.0, 0.5, 0.9):
                done = torch.arange(n, device=device) < int(n * fraction)
                row[f"{fraction:.0%} done"] = step_ms(decoder, prompt, lambda done=done: decoder.step(token, done))
        results.setdefault("ours_step_ms_with_finished_rows", {})[n] = row
        print("finished rows", n, row, flush=True)

    def profile_step(n: int):
        """Which kernels one decode step spends its time in (run eagerly: a graph hides them)."""
        from torch.profiler import ProfilerActivity, profile

        _, _, decoder, _ = prefilled(n)
        with torch.no_grad():
            token = torch.full((n,), 5, dtype=torch.long, device=device)
            decoder.cache.window = 128
            for _ in range(3):
                decoder._step_logits(token)
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    decoder._step_logits(token)
                sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
        print(table, flush=True)
        results[f"profile_step_table_{n}"] = table

    def profile_encode(n: int):
        """Which kernels the image encoder and the prefill spend their time in, at batch n."""
        from torch.profiler import ProfilerActivity, profile

        model, pixels, decoder, prompt = prefilled(n)
        with torch.no_grad():
            sync()
            for name, fn in (("vision", lambda: model.get_image_features(pixels)),
                             ("prefill", lambda: decoder.prefill(*prompt))):
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    sync()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60)
                print(name, n, table, flush=True)
                results[f"profile_{name}_table_{n}"] = table

    def gemv_bandwidth():
        """Achieved bandwidth of F.linear at one row for each weight shape of the decoder (graph-replayed)."""
        rows = {}
        for out_f, in_f in ((6144, 2048), (2048, 2048), (8192, 2048), (2048, 8192), (65037, 2048)):
            weight = torch.randn(out_f, in_f, device=device, dtype=dtype)
            bias = torch.randn(out_f, device=device, dtype=dtype)
            x = torch.randn(1, in_f, device=device, dtype=dtype)
            graph = torch.cuda.CUDAGraph()
            torch.nn.functional.linear(x, weight, bias)
            sync()
            with torch.cuda.graph(graph):
                for _ in range(20):
                    torch.nn.functional.linear(x, weight, bias)
            seconds = median_time(graph.replay, 10, sync) / 20
            rows[f"{out_f}x{in_f}"] = {"us": seconds * 1e6, "GB/s": weight.numel() * 2 / seconds / 1e9}
            print("gemv", out_f, in_f, rows[f"{out_f}x{in_f}"], flush=True)
        results["gemv"] = rows

    def kernels_check():
        """The Triton kernels against PyTorch on fresh random inputs (bf16 tolerance)."""
        from kosmos2_cli.fast import kernels

        rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm())  # noqa: E731
        x = torch.randn(37, 2048, device=device, dtype=dtype) * 3 + 1
        w, b = torch.randn(2048, device=device, dtype=dtype), torch.randn(2048, device=device, dtype=dtype)
        results["kernel_layer_norm_rel_err"] = rel(kernels.layer_norm(x, w, b, 1e-5),
                                                   torch.nn.functional.layer_norm(x, (2048,), w, b, 1e-5))
        # The decode step's kernel: writes each row's new key/value at its slot, attends over its filled slots.
        q, k_new, v_new = (torch.randn(5, 32, 1, 64, device=device, dtype=dtype) for _ in range(3))
        keys, values = (torch.randn(5, 32, 150, 64, device=device, dtype=dtype) for _ in range(2))
        used = torch.tensor([150, 90, 1, 150, 37], device=device)
        rows, here = torch.arange(5, device=device), used - 1
        valid = torch.rand(5, 150, device=device) > 0.3
        valid[rows, here] = True
        want_k, want_v = keys.clone(), values.clone()
        want_k[rows, :, here], want_v[rows, :, here] = k_new[:, :, 0], v_new[:, :, 0]
        cut = valid & (torch.arange(150, device=device) < used[:, None])
        want = torch.nn.functional.scaled_dot_product_attention(q, want_k, want_v, attn_mask=cut[:, None, None, :])
        got = kernels.decode_attention_append(q, k_new, v_new, keys, values, here[:, None], valid, used, 64**-0.5)
        results["kernel_decode_attention_rel_err"] = rel(got, want)
        results["kernel_decode_attention_cache_exact"] = bool(torch.equal(keys, want_k) and torch.equal(values, want_v))
        x = torch.randn(3, 257, 4096, device=device, dtype=dtype) * 3
        results["kernel_quick_gelu_rel_err"] = rel(kernels.quick_gelu(x), x * torch.sigmoid(1.702 * x))
        # The batch-1 decode product: LayerNorm, product, bias, gelu (and a residual) in one kernel, in float32.
        norm = torch.nn.LayerNorm(2048, device=device, dtype=dtype)
        weight = torch.randn(8192, 2048, device=device, dtype=dtype) * 0.02
        bias = torch.randn(8192, device=device, dtype=dtype)
        row = torch.randn(1, 1, 2048, device=device, dtype=dtype) * 2
        residual = torch.randn(1, 1, 8192, device=device, dtype=dtype)
        want = torch.nn.functional.gelu(torch.nn.functional.linear(torch.nn.functional.layer_norm(
            row.float(), (2048,), norm.weight.float(), norm.bias.float()), weight.float(), bias.float())) + residual
        got = kernels.linear_row(row, weight, bias, norm=norm, activation="gelu", residual=residual)
        results["kernel_linear_row_rel_err"] = rel(got, want)
        # The residual add + LayerNorm and GELU + LayerNorm passes of the batched layers.
        x, h = torch.randn(37, 2048, device=device, dtype=dtype) * 3, torch.randn(37, 2048, device=device, dtype=dtype)
        total, normed = kernels.add_layer_norm(x, h, norm)
        results["kernel_add_layer_norm_rel_err"] = rel(normed, norm(x + h))
        results["kernel_add_layer_norm_sum_exact"] = bool(torch.equal(total, x + h))
        wide = torch.nn.LayerNorm(8192, device=device, dtype=dtype)
        y = torch.randn(37, 8192, device=device, dtype=dtype) * 2
        results["kernel_gelu_layer_norm_rel_err"] = rel(kernels.gelu_layer_norm(y, wide),
                                                        wide(torch.nn.functional.gelu(y)))
        print("kernels", {k: v for k, v in results.items() if k.startswith("kernel_")}, flush=True)

    def profile_generate():
        """A whole batch-1 generate(): wall time against GPU busy time, and the host's busiest calls."""
        from torch.profiler import ProfilerActivity, profile

        model = state["ours"]
        kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        with torch.no_grad():
            for _ in range(2):
                model.generate(**one, **kwargs)
            sync()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                model.generate(**one, **kwargs)
                sync()
                wall = time.perf_counter() - t0
        events = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in events) / 1e3
        results["generate_wall_ms"], results["generate_gpu_busy_ms"] = wall * 1e3, gpu
        table = events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50)
        print(f"generate wall {wall * 1e3:.1f} ms, gpu busy {gpu:.1f} ms\n{table}", flush=True)
        results["profile_generate_table"] = table

    def fast_vs_plain():
        """The fast path (fused projections, Triton LayerNorm, graphs) against our plain eager model."""
        plain = Kosmos2ForConditionalGeneration.from_pretrained(folder, device=device, dtype=dtype, fast=False)
        fast = state["ours"]
        with torch.no_grad():
            a, b = fast(**one).logits[0, -1].float(), plain(**one).logits[0, -1].float()
            results["fast_vs_plain_first_step_rel_err"] = float((a - b).norm() / b.norm())
            x, y = fast.generate(**one, max_new_tokens=32), plain.generate(**one, max_new_tokens=32)
        results["fast_vs_plain_same_tokens"] = bool(torch.equal(x, y))
        del plain
        gc.collect()
        torch.cuda.empty_cache()

    def fresh_loads():
        """Load to first token, each in a new process (so CUDA's start-up counts alike); ours six times (the
        first run also fills Triton's kernel cache, as a user's first run does), the reference twice."""
        names = ("ours",) * 6 + (() if args.no_reference else ("ref", "ref"))
        fill_bytecode_cache(args.weights.parent, results)
        for name in names:
            env = subprocess_env(args.weights.parent)
            out = subprocess.run([sys.executable, __file__, "--load-only", name, "--weights",
                                  str(folder)], capture_output=True, text=True, check=True, env=env).stdout
            phases = json.loads(out.strip().splitlines()[-1])
            seconds = phases["load_to_first_token_s"]
            results.setdefault(f"fresh_load_{name}_s", []).append(seconds)
            results.setdefault(f"fresh_load_{name}_phases", []).append(phases)
            print("fresh load", name, seconds, flush=True)

    def end_to_end():
        """`kosmos2 batch` over a folder of JPEGs: decoding, preprocessing, the model and the JSON lines."""
        images = args.weights.parent / f"kosmos2-e2e-{args.e2e}"
        make_jpegs(images, args.e2e)
        out = images.parent / "e2e.jsonl"
        out.unlink(missing_ok=True)
        profile = args.out / "batch.prof" if args.out and args.e2e_profile else None
        runner = [sys.executable, "-m", "cProfile", "-o", str(profile)] if profile else [sys.executable]
        if profile:
            args.out.mkdir(parents=True, exist_ok=True)
        command = [*runner, "-m", "kosmos2_cli", "batch", str(images), "-o", str(out), "--model",
                   str(folder), "--max-new-tokens", str(NEW_TOKENS), "--batch-size", str(args.batch_size_e2e),
                   "--json", "--quiet"]
        fill_bytecode_cache(args.weights.parent, results)
        t0 = time.perf_counter()
        done = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env(args.weights.parent))
        progress = []  # (seconds, records written): the steady rate, apart from start-up and model load
        while done.poll() is None:
            time.sleep(0.1)
            if out.exists():
                progress.append((time.perf_counter() - t0, out.read_bytes().count(b"\n")))
        wall = time.perf_counter() - t0
        stdout, stderr = done.communicate()
        lines = out.read_text().splitlines() if out.exists() else []
        summary = stdout.strip().splitlines()[-1] if stdout.strip() else stderr[-2000:]

        def at(fraction: float) -> tuple[float, int]:
            return next(p for p in progress if p[1] >= fraction * args.e2e)

        (t_a, n_a), (t_b, n_b) = at(0.1), at(0.9)
        results["e2e"] = {"images": args.e2e, "records": len(lines), "wall_s": wall, "exit": done.returncode,
                          "images_per_s_wall": len(lines) / wall, "first_record_s": at(1 / args.e2e)[0],
                          "images_per_s_steady": (n_b - n_a) / (t_b - t_a), "summary": summary}
        print("e2e", results["e2e"], flush=True)
        if profile and profile.exists():
            import io
            import pstats

            text = io.StringIO()
            stats = pstats.Stats(str(profile), stream=text)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("tottime").print_stats(25)
            results["e2e_profile"] = text.getvalue()
            print(text.getvalue()[-9000:], flush=True)

    def run_all() -> None:
        section("load ours", results, load_ours)
        if args.profile:
            section("profile generate", results, profile_generate)
            section("profile step 1", results, lambda: profile_step(1))
            section("profile step 256", results, lambda: profile_step(256))
            section("profile encode 256", results, lambda: profile_encode(256))
            section("gemv", results, gemv_bandwidth) if not args.quick else None
        section("kernels", results, kernels_check)
        section("fast vs plain", results, fast_vs_plain)
        for n in (1, 64, 256, 512):
            section(f"breakdown {n}", results, lambda n=n: breakdown(n))
        section("finished rows", results, lambda: finished_rows(512))
        if not args.no_reference:
            section("load reference", results, load_reference)
            section("fidelity", results, fidelity)
        section("ours", results, lambda: latency_and_throughput("ours", ours_sizes))
        state["ours"].workspace.clear()  # the reference's large batches need the memory
        gc.collect()
        torch.cuda.empty_cache()
        if not args.no_reference:
            section("reference", results, lambda: latency_and_throughput("ref", ref_sizes))

    if not args.e2e_only:
        run_all()
    if args.e2e:
        state.pop("ours", None)
        state.pop("ref", None)
        gc.collect()
        torch.cuda.empty_cache()
        section("end to end", results, end_to_end)
    if not args.e2e_only:
        section("fresh loads", results, fresh_loads)

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        dump(args.out / "results.json", results)
    print_table(results)


def print_table(results: dict) -> None:
    ours = results.get("ours_batches", {})
    ref = results.get("ref_batches", {})
    print(f"\nKosmos-2 GPU benchmark on {results['card']} (torch {results['torch']}), bf16, {NEW_TOKENS} tokens")
    print(f"{'batch':>6} | {'ours s/gen':>10} | {'ours img/s':>10} | {'ref s/gen':>9} | {'ref img/s':>9} | speed-up"
          f" | ours peak GB | ref peak GB")
    for n in sorted(set(ours) | set(ref), key=int):
        o, r = ours.get(n, {}), ref.get(n, {})
        os_, rs = o.get("s_per_generate"), r.get("s_per_generate")
        ratio = f"{rs / os_:.1f}x" if os_ and rs else ""
        fmt = lambda v, f: (f % v) if v else ("OOM" if v is None and False else "-")  # noqa: E731
        print(f"{n:>6} | {fmt(os_, '%10.3f'):>10} | {fmt(o.get('images_per_s'), '%10.1f'):>10} | "
              f"{fmt(rs, '%9.3f'):>9} | {fmt(r.get('images_per_s'), '%9.1f'):>9} | {ratio:>8} | "
              f"{fmt(o.get('peak_gb'), '%12.1f'):>12} | {fmt(r.get('peak_gb'), '%11.1f'):>11}")
    for key in ("ours_load_to_first_token_s", "ref_load_to_first_token_s", "ours_weights_gb",
                "first_step_rel_err_ours_bf16_vs_ref_fp32", "first_step_rel_err_ref_bf16_vs_ref_fp32",
                "first_step_rel_err_ours_bf16_vs_ref_bf16", "greedy_agree_tokens", "greedy_clear_margin_tokens",
                "greedy_margins_first8", "reference_resampler_was_causal", "ours_breakdown", "gemv",
                "kernel_layer_norm_rel_err", "kernel_decode_attention_rel_err",
                "kernel_decode_attention_cache_exact", "kernel_quick_gelu_rel_err",
                "generate_wall_ms", "generate_gpu_busy_ms", "fast_vs_plain_first_step_rel_err",
                "fast_vs_plain_same_tokens", "fresh_load_ours_s", "fresh_load_ref_s", "fresh_load_ours_phases",
                "fresh_load_ref_phases", "import_torch_s_with_bytecode_cache", "ours_script_path_is_fast",
                "kernel_linear_row_rel_err", "kernel_add_layer_norm_rel_err", "kernel_add_layer_norm_sum_exact",
                "kernel_gelu_layer_norm_rel_err", "ours_step_ms_with_finished_rows", "e2e",
                "ours_load_phases_s", "errors"):
        if key in results:
            print(f"{key}: {json.dumps(results[key])}")


if __name__ == "__main__":
    main()
