"""Choosing the device and dtype from the user's `--device` / `--dtype` words."""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    # Weight-only int8 (CPU): int8 weights with per-channel scales, float activations; see kosmos2_cli.model.quant.
    "int8": torch.int8,
    "qint8": torch.int8,
}


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`auto` is CUDA when present; `cuda:N` is checked so a wrong index fails here, in one clear line."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from err
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
        index = target.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but only {torch.cuda.device_count()} GPU(s) exist")
    elif target.type not in ("cpu", "mps"):
        raise ValueError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return target


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on CUDA that supports it, fp16 on older CUDA, fp32 elsewhere. `int8` is CPU-only."""
    if isinstance(dtype, torch.dtype):
        if dtype == torch.int8 and device.type != "cpu":
            return resolve_dtype("int8", device)
        return dtype
    name = (dtype or "auto").strip().lower().removeprefix("torch.")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16, float16 or int8)")
    resolved = DTYPES[name]
    if resolved == torch.int8 and device.type != "cpu":
        raise ValueError(f"dtype int8 runs on the CPU only (device {device}); on a GPU use bfloat16 or float16")
    return resolved
