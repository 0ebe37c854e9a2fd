"""Decode-step attention on the GPU: the fused Triton cache write + attention per block config, beside the eager path.

`PYTHONPATH=src python benchmarks/attention.py` (CUDA only). Checks each variant against float32 attention over
the same cache (relative error of the norm) and times 24 launches (one per decoder
layer) replayed as a CUDA graph, median of 20, with the bytes a step must read and the bandwidth that makes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from common import graph_time

from kosmos2_cli.fast.kernels import decode_attention_append
from kosmos2_cli.model.cache import KVCache

LAYERS, HEADS, HEAD_DIM = 24, 32, 64
CONFIGS = [(block, warps) for block in (64, 128) for warps in (2, 4)] + [(None, None)]


def reference(q, keys, values, valid, scale):
    scores = (q.float() @ keys.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    return scores.softmax(-1) @ values.float()


def measure(batch: int, length: int, capacity: int, device: torch.device, dtype: torch.dtype) -> list[dict]:
    """Every variant at one batch size: error against float32 attention, time per layer, bandwidth."""
    scale = HEAD_DIM**-0.5
    torch.manual_seed(batch)
    cache = KVCache(1, batch, HEADS, HEAD_DIM, capacity, device, dtype)
    cache.keys[0].normal_()
    cache.values[0].normal_()
    # Rows of different lengths around the mean; a padded slot inside the prompt of even batch sizes.
    lengths = (length + torch.randint(-8, 9, (batch,), device=device)).clamp(2, capacity - 1)
    cache.valid[:] = torch.arange(capacity, device=device)[None, :] < lengths[:, None] - 1
    cache.valid[:, 3] = batch % 2 == 1
    cache.next_slot.copy_(lengths - 1)
    cache.static = True
    slots = cache.append(torch.ones(batch, 1, dtype=torch.bool, device=device))
    fused_in = torch.randn(batch, 1, 3 * HEADS * HEAD_DIM, device=device, dtype=dtype)
    q, k, v = (t.unflatten(-1, (HEADS, HEAD_DIM)).transpose(1, 2) for t in fused_in.chunk(3, dim=-1))
    keys0, values0 = cache.keys[0].clone(), cache.values[0].clone()
    written_k, written_v = keys0.clone(), values0.clone()
    index = torch.arange(batch, device=device)
    written_k[index, :, slots[:, 0]] = k[:, :, 0]
    written_v[index, :, slots[:, 0]] = v[:, :, 0]
    want = reference(q, written_k, written_v, cache.valid, scale)
    read_bytes = int(cache.valid.sum()) * HEADS * HEAD_DIM * 2 * 2

    def separate():  # the eager path: scatter into the cache, then PyTorch's attention with the valid mask
        kk, vv = cache.update(0, slots, k, v)
        mask = cache.visible_valid()[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scale)

    rows = []
    variants = [("scatter + SDPA", separate)]
    for block, warps in CONFIGS:
        variants.append((f"fused (block {block}, {warps} warps)" if block else "fused (default config)",
                         lambda block=block, warps=warps: decode_attention_append(
                             q, k, v, cache.keys[0], cache.values[0], slots, cache.valid, cache.next_slot, scale,
                             block, warps)))
    for name, fn in variants:
        cache.keys[0].copy_(keys0)
        cache.values[0].copy_(values0)
        out = fn()
        same_cache = bool(torch.equal(cache.keys[0], written_k) and torch.equal(cache.values[0], written_v))
        err = ((out.float() - want).norm() / want.norm()).item()
        seconds = graph_time([fn] * LAYERS, 20)
        rows.append({"batch": batch, "variant": name, "rel_err": err, "cache_written": same_cache,
                     "us": seconds * 1e6, "GB/s": read_bytes / seconds / 1e9})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", default="1,64,256,512")
    parser.add_argument("--length", type=int, default=104, help="filled slots per row (mean of a 64-token caption)")
    parser.add_argument("--capacity", type=int, default=160)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows = []
    for batch in (int(x) for x in args.batch_sizes.split(",")):
        rows += measure(batch, args.length, args.capacity, device, dtype)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{torch.cuda.get_device_name()}, {os.environ.get('CUDA_VISIBLE_DEVICES', 'gpu 0')}, "
          f"length {args.length}, capacity {args.capacity}")
    print("| batch | variant | rel. error | cache ok | us / layer | GB/s |\n| ---: | --- | ---: | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['batch']} | {r['variant']} | {r['rel_err']:.1e} | {r.get('cache_written', '')} | "
              f"{r['us']:.1f} | {r['GB/s']:.0f} |")


if __name__ == "__main__":
    main()
