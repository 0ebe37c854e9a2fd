"""The fast path's Triton kernels compiled before the model needs them, in processes of their own.

On a machine that has never run them, each kernel's first launch compiles it (0.1-0.6 s) and builds its C
launcher with gcc (~0.3 s): nine of them one after another in the first image's forward, ~4-5 s on an H100 host
before the first record. Compiled on threads of the same process they were no quicker (Triton's compiler holds
Python's lock: H100, 2026-12-07). So a command starts a few worker processes (`compile_worker`) as soon as it
knows the model folder, before it imports torch; each compiles some of the kernels into Triton's disk cache, each
from a launch at the model's widths, dtypes and layouts (what selects the specialisation Triton compiles), and
builds its launcher there. The model's first launch of a kernel waits for them (`ahead.ready`), then takes it from
the cache. A probe whose arguments did not match the model's only compiles a kernel that is not used: the model's
launch compiles its own, as it would have. `KOSMOS2_PRECOMPILE=0` turns this off.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from kosmos2_cli.fast import ahead

if TYPE_CHECKING:  # torch is not imported here: the command line starts the workers before it imports torch
    import torch

    from kosmos2_cli.model.config import Kosmos2Config

WORKERS = 8  # at most (and at most half the cores): each compiles every WORKERS-th probe
WAIT = 120.0  # seconds a model waits for the workers at most (then it compiles what is missing itself)
_started: list[bool] = []


def enabled() -> bool:
    return os.environ.get("KOSMOS2_PRECOMPILE", "1").strip() != "0"


def start(folder: str | Path, device: object = "auto", dtype: object = "auto") -> bool:
    """Start the compile workers for the model in `folder` on `device` (a GPU, or `auto` where one may be) in
    `dtype`, once a process; False where they were not started (already, turned off, no config there)."""
    config = Path(folder) / "config.json"
    if _started or not enabled() or not config.is_file():
        return False
    _started.append(True)
    parts = max(1, min(WORKERS, (os.cpu_count() or 2) // 2))
    command = [sys.executable, "-m", "kosmos2_cli.fast.compile_worker", str(config), str(device),
               str(dtype).removeprefix("torch.")]
    try:
        workers = [subprocess.Popen([*command, str(part), str(parts)], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for part in range(parts)]
    except OSError:
        return False
    ahead.begin([functools.partial(_wait, worker) for worker in workers])
    return True


def _wait(worker: subprocess.Popen) -> None:
    try:
        worker.wait(WAIT)
    except subprocess.TimeoutExpired:
        worker.kill()


def probes(config: Kosmos2Config, device: torch.device, dtype: torch.dtype) -> list[Callable[[], object]]:
    """One small launch per kernel specialisation the model uses: the image encoder's, a prompt's, a decode step's
    at many rows and at one."""
    import torch

    from kosmos2_cli.fast import kernels
    from kosmos2_cli.fast.fuse import power_of_two

    vision, text = config.vision_config, config.text_config

    def rows(width: int, count: int = 2) -> torch.Tensor:
        return torch.zeros(count, width, device=device, dtype=dtype)

    def norm(width: int) -> torch.nn.LayerNorm:
        return torch.nn.LayerNorm(width, eps=text.layer_norm_eps, device=device, dtype=dtype)

    wide, width, ffn = vision.hidden_size, text.embed_dim, text.ffn_dim
    calls: list[Callable[[], object]] = [
        lambda: kernels.layer_norm(rows(wide), *_affine(norm(wide))),  # pre-LN, first layer's norm
        lambda: kernels.layer_norm(rows(wide), *_affine(norm(wide)), l2_normalize=True),  # the image features
        lambda: kernels.add_layer_norm(rows(wide), rows(wide), norm(wide)),
        lambda: kernels.quick_gelu(rows(vision.intermediate_size)),
        lambda: kernels.layer_norm(rows(width), *_affine(norm(width))),  # first layer's norm, inner attention's
        lambda: kernels.add_layer_norm(rows(width), rows(width), norm(width)),
        lambda: kernels.gelu_layer_norm(rows(ffn), norm(ffn)),
        lambda: kernels.argmax_log_softmax(_logits(text.vocab_size, device, dtype)),
    ]
    if power_of_two(text.embed_dim // text.attention_heads):  # else the model attends without the kernel
        for block, warps in {(128, 4), (64, 2)}:  # few rows, many (decode_attention_append's own choice)
            calls.append(lambda block=block, warps=warps: _decode_attention(text, device, dtype, block, warps))
        calls.extend(_one_row(text, device, dtype))
    return calls


def _affine(layer: torch.nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor, float]:
    return layer.weight, layer.bias, layer.eps


def _logits(vocab: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Two rows of logits as the head gives them: the vocabulary's columns of a product padded to 64 rows."""
    import torch

    padded = -(-vocab // 64) * 64
    return torch.zeros(2, padded, device=device, dtype=dtype)[:, :vocab]


def _decode_attention(text, device: torch.device, dtype: torch.dtype, block: int, warps: int) -> torch.Tensor:
    """A decode step's attention over a 64-slot cache, q/k/v being views of one fused projection (as the model's)."""
    import torch

    from kosmos2_cli.fast import kernels

    heads, width = text.attention_heads, text.embed_dim
    head_dim, batch, slots = width // heads, 2, 64

    def split(t: torch.Tensor) -> torch.Tensor:  # as Attention.split
        return t.unflatten(-1, (heads, head_dim)).transpose(1, 2)

    q, k, v = (split(t) for t in torch.zeros(batch, 1, 3 * width, device=device, dtype=dtype).chunk(3, dim=-1))
    keys, values = (torch.zeros(batch, heads, slots, head_dim, device=device, dtype=dtype) for _ in range(2))
    valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
    used = torch.ones(batch, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    return kernels.decode_attention_append(q, k, v, keys, values, used[:, None], valid, used, head_dim**-0.5,
                                           block=block, warps=warps, done=done)


def _one_row(text, device: torch.device, dtype: torch.dtype) -> list[Callable[[], object]]:
    """A batch-1 decode step's matrix-vector products (FastDecoderLayer) and the head's."""
    import torch

    from kosmos2_cli.fast import kernels

    width, ffn = text.embed_dim, text.ffn_dim

    def row(n: int) -> torch.Tensor:
        return torch.zeros(1, 1, n, device=device, dtype=dtype)

    def weight(out: int, into: int) -> torch.Tensor:
        return torch.empty(out, into, device=device, dtype=dtype)

    def norm(n: int) -> torch.nn.LayerNorm:
        return torch.nn.LayerNorm(n, eps=text.layer_norm_eps, device=device, dtype=dtype)

    def bias(n: int) -> torch.Tensor:
        return torch.zeros(n, device=device, dtype=dtype)

    return [
        lambda: kernels.linear_row(row(width), weight(3 * width, width), bias(3 * width), norm=norm(width)),
        lambda: kernels.linear_row(row(width), weight(width, width), bias(width), norm=norm(width),
                                   residual=row(width)),
        lambda: kernels.linear_row(row(width), weight(ffn, width), bias(ffn), norm=norm(width), activation="gelu"),
        lambda: kernels.linear_row(row(ffn), weight(width, ffn), bias(width), norm=norm(ffn), residual=row(width)),
        lambda: kernels.linear_row(row(width), weight(text.vocab_size, width), None),
    ]
