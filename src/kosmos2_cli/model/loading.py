"""Building a model from a checkpoint in the hub's layout: the folder (local or from the hub cache), the model on
the meta device, its weights straight to the target device and dtype, int8 quantized while read."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from kosmos2_cli.model.config import Kosmos2Config
from kosmos2_cli.model.devices import resolve_device, resolve_dtype
from kosmos2_cli.model.hub import resolve_model_dir
from kosmos2_cli.model.layers import Attention
from kosmos2_cli.model.weights import load_weights

M = TypeVar("M", bound=nn.Module)


def load_pretrained(cls: type[M], name_or_path: str | Path, *, revision: str | None = None,
                    device: str | torch.device | None = "cpu", dtype: str | torch.dtype | None = None) -> M:
    """`cls` (a Kosmos-2 model class) with the checkpoint's weights, in eval mode.

    `dtype` None keeps the file's; "int8" (CPU only) is weight-only int8 with per-channel scales (see `quant`).
    """
    folder = resolve_model_dir(name_or_path, revision=revision)
    config = Kosmos2Config.from_json_file(folder / "config.json")
    with torch.device("meta"), no_init():
        model = cls(config)
    target = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target)
    quantized = target_dtype == torch.int8
    if quantized:
        from kosmos2_cli.model.quant import allocate, free_scratch, fuse_attention, quantize_modules

        with torch.device("meta"), no_init():
            quantize_modules(model)  # int8 weights, quantized as they are read; the rest in float32
        allocate(model, target)  # one block for all int8 weights, q/k/v side by side
    load_weights(model, folder, device=target, dtype=torch.float32 if quantized else target_dtype)
    if quantized:
        for module in model.modules():
            if isinstance(module, Attention):
                fuse_attention(module)  # one int8 layer for q/k/v: fewer, larger kernel calls per step
        model.cache_dtype = torch.bfloat16
        free_scratch("quantize")
    return model.eval()


@contextmanager
def no_init() -> Iterator[None]:
    """Build modules without initialising their weights: the checkpoint overwrites them anyway, and on the meta
    device PyTorch's init functions go through its decompositions, which import torch._dynamo (seconds)."""
    classes = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.Conv2d)
    saved = [cls.reset_parameters for cls in classes]
    for cls in classes:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, reset in zip(classes, saved, strict=True):
            cls.reset_parameters = reset
