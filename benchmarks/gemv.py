"""Batch-1 decoding's matrix-vector products on the GPU: the one-row Triton kernel (`kernels.linear_row`) per
block config beside cuBLAS, its fused variants checked against the separate kernels, and (with --weights) a
batch-1 caption of the full-size model with and without it.

`PYTHONPATH=src python benchmarks/gemv.py [--weights DIR] [--out DIR]` (CUDA only). Every product is timed over
enough distinct weight copies (>= 400 MB) that the 50 MB L2 cache cannot serve them, replayed as a CUDA graph.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import graph_time

from kosmos2_cli.fast import kernels

SHAPES = {"qkv": (6144, 2048), "out_proj": (2048, 2048), "fc1": (8192, 2048), "fc2": (2048, 8192),
          "head": (65037, 2048)}
CONFIGS = [(n, k, w) for n in (4, 8, 16) for k in (256, 512, 1024) for w in (2, 4, 8)]
DTYPE = torch.bfloat16


def copies_of(out_f: int, in_f: int):
    count = max(2, math.ceil(400e6 / (out_f * in_f * 2)))
    return [(torch.randn(out_f, in_f, device="cuda", dtype=DTYPE) * 0.02,
             torch.randn(out_f, device="cuda", dtype=DTYPE) * 0.02) for _ in range(count)]


def sweep(results: dict) -> None:
    for name, (out_f, in_f) in SHAPES.items():
        sweep_shape(results, name, out_f, in_f)
        torch.cuda.empty_cache()


def sweep_shape(results: dict, name: str, out_f: int, in_f: int) -> None:
    weights = copies_of(out_f, in_f)
    x = torch.randn(1, 1, in_f, device="cuda", dtype=DTYPE)
    nbytes = out_f * in_f * 2
    row = {"cublas_us": graph_time([lambda w=w, b=b: F.linear(x, w, b) for w, b in weights]) * 1e6}
    configs = {}
    for config in CONFIGS:
        try:
            seconds = graph_time([lambda w=w, b=b, c=config: kernels.linear_row(x, w, b, config=c)
                                  for w, b in weights])
        except Exception as err:  # noqa: BLE001 - a config the compiler refuses is reported, not fatal
            configs[str(config)] = f"{type(err).__name__}: {err}"[:200]
            continue
        configs[str(config)] = seconds * 1e6
    timed = {c: us for c, us in configs.items() if isinstance(us, float)}
    best = min(timed, key=timed.get)
    row.update(best=best, best_us=timed[best], cublas_gbs=nbytes / row["cublas_us"] / 1e3,
               best_gbs=nbytes / timed[best] / 1e3, configs=configs)
    results.setdefault("sweep", {})[name] = row
    top = sorted(timed, key=timed.get)[:4]
    print(f"{name:9s} {out_f}x{in_f}: cuBLAS {row['cublas_us']:7.1f} us ({row['cublas_gbs']:5.0f} GB/s); "
          f"best {best} {timed[best]:7.1f} us ({row['best_gbs']:5.0f} GB/s); next "
          + ", ".join(f"{c} {timed[c]:.1f}" for c in top[1:]), flush=True)


def fused_check(results: dict) -> None:
    """Each fused use against LayerNorm kernel -> F.linear -> activation -> residual, and their times."""
    torch.manual_seed(0)
    layers = 24
    uses = {"qkv": (6144, 2048, None, False), "out_proj": (2048, 2048, None, True),
            "fc1": (8192, 2048, "gelu", False), "fc2": (2048, 8192, None, True)}
    for name, (out_f, in_f, act, residual) in uses.items():
        check_use(results, name, out_f, in_f, act, residual, layers)


def check_use(results: dict, name: str, out_f: int, in_f: int, act: str | None, residual: bool, layers: int) -> None:
    norm = torch.nn.LayerNorm(in_f, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
        norm.bias.normal_(0.0, 0.1)
    weights = copies_of(out_f, in_f)[:layers]
    x = torch.randn(1, 1, in_f, device="cuda", dtype=DTYPE) * 2 + 0.5
    res = torch.randn(1, 1, out_f, device="cuda", dtype=DTYPE) if residual else None

    def separate(w, b):
        h = F.linear(kernels.layer_norm(x, norm.weight, norm.bias, norm.eps), w, b)
        h = F.gelu(h) if act else h
        return h + res if residual else h

    def fused(w, b):
        return kernels.linear_row(x, w, b, norm=norm, activation=act, residual=res)

    with torch.no_grad():
        want, got = separate(*weights[0]), fused(*weights[0])
        row = {"rel_err": float((got.float() - want.float()).norm() / want.float().norm()),
               "max_abs": float((got.float() - want.float()).abs().max()),
               "differ_fraction": float((got != want).float().mean()),
               "separate_us": graph_time([lambda w=w, b=b: separate(w, b) for w, b in weights]) * 1e6,
               "fused_us": graph_time([lambda w=w, b=b: fused(w, b) for w, b in weights]) * 1e6}
    results.setdefault("fused", {})[name] = row
    print("fused", name, {k: round(v, 6) for k, v in row.items()}, flush=True)


def model_check(results: dict, folder: Path) -> None:
    """The full-size model at batch 1: 64-token caption and decode step with and without the one-row kernels."""
    from common import synthetic_image

    from kosmos2_cli import Kosmos2ForConditionalGeneration, Kosmos2Processor
    from kosmos2_cli.generation.generate import Decoder
    from kosmos2_cli.model.text import DecoderLayer

    processor = Kosmos2Processor.from_pretrained(folder)
    inputs = processor(text="<grounding> An image of", images=synthetic_image(), return_tensors="pt").to("cuda")
    from kosmos2_cli.fast.modules import FastHead

    class CublasHead(FastHead):
        def forward(self, hidden):  # the padded product at every batch size: no one-row kernel
            return torch.nn.functional.linear(hidden, self.padded)[..., : self.out_features]

    model = Kosmos2ForConditionalGeneration.from_pretrained(folder, device="cuda", dtype=DTYPE)
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    kwargs = dict(max_new_tokens=64, min_new_tokens=64)
    out = {}
    device = torch.device("cuda", torch.cuda.current_device())
    pdl = kernels.use_pdl(device)
    for key in (("pdl",) if pdl else ()) + ("one_row", "cublas"):
        for layer in layers:
            layer.one_row = key == "one_row" or key == "pdl"
        model.text_model.lm_head.__class__ = CublasHead if key == "cublas" else FastHead
        kernels._PDL[(device.type, device.index)] = key == "pdl"
        model.workspace.clear()
        with torch.no_grad():
            tokens = model.generate(**inputs, **kwargs)
            times = []
            for _ in range(7):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(**inputs, **kwargs)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            ids = inputs["input_ids"]
            embeds = model.get_image_features(inputs["pixel_values"])
            decoder = Decoder.for_model(model, 1, ids.shape[1] + 64, torch.device("cuda"))
            prompt = (ids, inputs["attention_mask"].bool(), embeds, inputs["image_embeds_position_mask"])
            first = decoder.prefill(*prompt).clone()
            token = torch.full((1,), 5, dtype=torch.long, device="cuda")
            step_logits = decoder.step(token).clone()
            step_times = []
            for _ in range(5):
                decoder.prefill(*prompt)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(32):
                    decoder.step(token).argmax(dim=-1)
                torch.cuda.synchronize()
                step_times.append((time.perf_counter() - start) / 32)
        out[key] = {"caption_s": statistics.median(times), "step_ms": statistics.median(step_times) * 1e3,
                    "tokens": tokens[0].tolist(), "first": first, "step_logits": step_logits}
        print(key, out[key]["caption_s"], out[key]["step_ms"], flush=True)
    if "pdl" in out:
        results["model_pdl"] = {"caption_s": out["pdl"]["caption_s"], "step_ms": out["pdl"]["step_ms"],
                                "same_tokens_as_without": out["pdl"]["tokens"] == out["one_row"]["tokens"],
                                "step_logits_equal_without": bool(torch.equal(out["pdl"]["step_logits"],
                                                                              out["one_row"]["step_logits"]))}
        print("pdl", results["model_pdl"], flush=True)
    a, b = out["one_row"], out["cublas"]
    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"], strict=True))
    rel = float((a["step_logits"] - b["step_logits"]).norm() / b["step_logits"].norm())
    results["model"] = {"one_row_caption_s": a["caption_s"], "cublas_caption_s": b["caption_s"],
                        "one_row_step_ms": a["step_ms"], "cublas_step_ms": b["step_ms"],
                        "same_tokens": same, "tokens": len(a["tokens"]), "step_logits_rel_err": rel}
    print("model", results["model"], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=None, help="full-size checkpoint folder (built if absent)")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.no_sweep:
        sweep(results)
    fused_check(results)
    if args.weights:
        from common import full_size_checkpoint

        model_check(results, full_size_checkpoint(args.weights))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gemv.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
