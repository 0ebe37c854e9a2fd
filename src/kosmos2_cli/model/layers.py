"""The building blocks both towers share: LayerNorm, activations, dropout, and multi-head attention.

Plain PyTorch. The CUDA fast path (`kosmos2_cli.fast`) swaps some of these modules for subclasses that run the
same maths in Triton kernels; the hooks it overrides are the small methods here (`LayerNorm.add_norm`,
`Attention.project`, `Attention.attend_cache`, ...), each with its plain meaning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from kosmos2_cli.model.cache import KVCache


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout in training only; in eval the input comes back untouched (no extra op for inference or graphs)."""
    return F.dropout(x, p, training=True) if training and p > 0 else x


def activation(name: str):
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return quick_gelu
    if name == "relu":
        return F.relu
    if name in ("silu", "swish"):
        return F.silu
    raise ValueError(f"unsupported activation function {name!r}")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm, with the combinations the inference arrangement asks for (fused by `fast`)."""

    def add_norm(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """(x + h, norm(x + h))."""
        x = x + h
        return x, self(x)

    def norm_l2(self, x: Tensor) -> Tensor:
        """F.normalize(norm(x)): the image features' last step."""
        return F.normalize(self(x), dim=-1)

    def act_norm(self, h: Tensor, name: str, act) -> Tensor:
        """norm(act(h)), `act` being the activation called `name`."""
        return self(act(h))


# Passed as an attention mask: plain causal attention, for prompts without padding (SDPA's flash kernel).
CAUSAL = object()


# Up to this batch, attention without a padding mask on CUDA runs FlashAttention itself (see `attend`); causal
# prompts do at any batch.
FLASH_MAX_BATCH = 16
_FLASH_DEVICES: dict[int, bool] = {}


def _flash_fits(q: Tensor, k: Tensor, mask: Tensor | None, dropout: float) -> bool:
    causal = mask is CAUSAL
    if causal and q.shape[-2] != k.shape[-2]:
        return False  # FlashAttention aligns a causal mask to the last key; SDPA's CAUSAL means the first
    if not (q.is_cuda and (q.shape[0] <= FLASH_MAX_BATCH or causal) and (mask is None or causal) and dropout == 0.0
            and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256 and not q.requires_grad and torch.version.hip is None):
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if index not in _FLASH_DEVICES:
        _FLASH_DEVICES[index] = torch.cuda.get_device_capability(index) >= (8, 0)
    return _FLASH_DEVICES[index]


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | object | None, dropout: float, scale: float) -> Tensor:
    """Scaled dot-product attention; `mask` is a boolean/additive mask, None, or CAUSAL.

    On Hopper PyTorch picks cuDNN's attention, which builds an execution plan for each shape on each thread: the
    first calls of a new process took 0.07-1 s apiece on an H100 (and again on each new thread), where
    FlashAttention starts in 0.03 s. Small batches (a caption, a few prompts: start-up dominates) therefore call
    FlashAttention directly, and so do causal prompts of any batch: a service prefills refills of every size, each
    a new shape to plan while the rows in flight wait (FlashAttention costs 6.3 ms where cuDNN takes 4.4 for 256
    prompts). Larger image batches, padded to a few sizes by the encoder's graphs, keep PyTorch's choice: cuDNN
    takes 11.8 ms where FlashAttention takes 16.7 for 256 images.
    """
    causal = mask is CAUSAL
    if _flash_fits(q, k, mask, dropout):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, dropout_p=dropout,
                                          is_causal=causal, scale=scale)


class Attention(nn.Module):
    """Multi-head attention; the decoder's adds a LayerNorm on the heads' output (sub-LN) before `out_proj`."""

    def __init__(self, dim: int, heads: int, inner_norm_eps: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout  # on the attention probabilities, in training mode only
        self.head_dim = dim // heads
        if self.head_dim * heads != dim:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.scale = self.head_dim**-0.5
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.inner_attn_ln = LayerNorm(dim, eps=inner_norm_eps) if inner_norm_eps is not None else None
        self.qkv: nn.Module | None = None  # an int8 model's one layer for q, k and v (`quant.fuse_attention`)

    def split(self, x: Tensor) -> Tensor:
        """(batch, length, dim) -> (batch, heads, length, head_dim)."""
        return x.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def project(self, x: Tensor, kv_source: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries from `x`, keys and values from `kv_source` (default `x`), split into heads."""
        if self.qkv is not None and kv_source is None:
            return tuple(self.split(t) for t in self.qkv(x).chunk(3, dim=-1))  # type: ignore[return-value]
        source = x if kv_source is None else kv_source
        return self.split(self.q_proj(x)), self.split(self.k_proj(source)), self.split(self.v_proj(source))

    def attend_cache(self, q: Tensor, k: Tensor, v: Tensor, mask, cache: KVCache | None, layer: int,
                     slots: Tensor | None) -> Tensor:
        """This call's keys and values appended to the cache (if any), then attention over what it holds."""
        if cache is not None:
            k, v = cache.update(layer, slots, k, v)
        if k.dtype != q.dtype:  # a cache narrower than the activations (int8 models): attend in its dtype
            q = q.to(k.dtype)
        return attend(q, k, v, mask, self.dropout if self.training else 0.0, self.scale)

    def forward(
        self,
        x: Tensor,
        kv_source: Tensor | None = None,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
        slots: Tensor | None = None,
    ) -> Tensor:
        q, k, v = self.project(x, kv_source)
        out = self.attend_cache(q, k, v, mask, cache, layer, slots)
        out = out.to(q.dtype).transpose(1, 2).flatten(2)
        if self.inner_attn_ln is not None:
            out = self.inner_attn_ln(out)
        return self.out_proj(out)
