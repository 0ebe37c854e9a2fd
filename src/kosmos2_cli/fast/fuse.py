"""Applying the fast path to a plain model from outside (gpt-fast's way), and taking it off again.

`fuse` swaps modules for their `fast.modules` subclasses in place (same parameters, same maths), fuses each
attention's q/k/v projections into one product whose views they become, and lets the layers hand their last
residual add to the next LayerNorm. On CUDA with Triton the kernels come too. Training is unaffected: each fast
module takes its fast way only while no gradient is recorded.
"""

from __future__ import annotations

import torch
from torch import nn

from kosmos2_cli.fast.modules import (
    FastAttention,
    FastDecoderLayer,
    FastHead,
    FastLayerNorm,
    FastVisionEmbeddings,
    fast_quick_gelu,
)
from kosmos2_cli.model.layers import Attention, LayerNorm, quick_gelu
from kosmos2_cli.model.text import DecoderLayer
from kosmos2_cli.model.vision import VisionEmbeddings, VisionLayer

_SWAPS: dict[type, type] = {Attention: FastAttention, LayerNorm: FastLayerNorm, DecoderLayer: FastDecoderLayer,
                            VisionEmbeddings: FastVisionEmbeddings, nn.Linear: FastHead}
_PLAIN = {fast: plain for plain, fast in _SWAPS.items()}


def kernels_for(device: torch.device) -> bool:
    """Whether the Triton kernels can run for a model on `device` (CUDA, with Triton installed)."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def is_fused(model: nn.Module) -> bool:
    return model.text_model.model.carry


@torch.no_grad()
def fuse(model: nn.Module) -> None:
    """Put `model` (a Kosmos-2 model of `kosmos2_cli.model`) on the fast path; doing it twice changes nothing."""
    if is_fused(model):
        return
    kernels = kernels_for(model.device)
    activations = ()
    if kernels:
        from kosmos2_cli.fast.kernels import ACTIVATIONS as activations
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = FastAttention
            if module.qkv is None:  # (an int8 model's are one int8 layer already)
                fuse_qkv(module)
            module.decode_kernel = kernels and power_of_two(module.head_dim)  # (Triton's arange needs one)
        elif type(module) is LayerNorm and kernels:
            module.__class__ = FastLayerNorm
        elif type(module) is VisionEmbeddings:
            module.__class__ = FastVisionEmbeddings
        if isinstance(module, (VisionLayer, DecoderLayer)) and kernels and module.act is quick_gelu:
            module.act = fast_quick_gelu
    model.text_model.model.carry = model.vision_model.model.carry = True
    if not kernels:
        return
    for layer in model.text_model.model.layers:
        layer.__class__ = FastDecoderLayer
        layer.one_row = (layer.self_attn.fused is not None and layer.self_attn.inner_attn_ln is not None
                         and layer.self_attn.decode_kernel and layer.activation_name in activations)
    head = model.text_model.lm_head
    if type(head) is nn.Linear:
        head.__class__ = FastHead
        rows = -(-head.weight.shape[0] // 64) * 64
        padding = head.weight.new_zeros(rows - head.weight.shape[0], head.weight.shape[1])
        head.register_buffer("padded", torch.cat([head.weight.detach(), padding]), persistent=False)


def unfuse(model: nn.Module) -> None:
    """Back to the plain modules (the fused q/k/v stay one block, of which the projections remain views)."""
    for module in model.modules():
        plain = _PLAIN.get(type(module))
        if plain is not None:
            for name in ("fused", "decode_kernel", "one_row"):
                module.__dict__.pop(name, None)
            if plain is nn.Linear:
                del module.padded
            module.__class__ = plain
        if getattr(module, "act", None) is fast_quick_gelu:
            module.act = quick_gelu
    model.text_model.model.carry = model.vision_model.model.carry = False


def fuse_qkv(attention: FastAttention) -> None:
    """One (3*dim, dim) projection instead of three; q/k/v_proj become views of it (no memory added)."""
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    weight = torch.cat([p.weight for p in projections])
    bias = torch.cat([p.bias for p in projections])
    replaced = [p.weight for p in projections]
    width = weight.shape[1]
    for i, proj in enumerate(projections):
        rows = slice(i * width, (i + 1) * width)
        proj.weight = nn.Parameter(weight[rows], requires_grad=proj.weight.requires_grad)
        proj.bias = nn.Parameter(bias[rows], requires_grad=proj.bias.requires_grad)
    attention.fused = (weight, bias)
    if weight.device.type == "cpu":
        from kosmos2_cli.model.safetensors_mmap import release_view

        for old in replaced:  # views of a memory-mapped checkpoint: hand their pages back (no double RSS)
            release_view(old)
