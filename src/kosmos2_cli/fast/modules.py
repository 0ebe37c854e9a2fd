"""The fast path's modules: subclasses of the plain model's, computing the same maths faster for inference.

`fuse.fuse` swaps them in (and `fuse.unfuse` out) by class, in place, keeping every parameter where it is. Each
takes its fast way only when no gradient is being recorded (`inferring`): with autograd on (training, or an
eval-mode backward pass) the plain parent's code runs, so gradients stay exactly the reference's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kosmos2_cli.model.cache import KVCache
from kosmos2_cli.model.layers import Attention, LayerNorm, quick_gelu
from kosmos2_cli.model.text import DecoderLayer
from kosmos2_cli.model.vision import VisionEmbeddings


def inferring() -> bool:
    """No gradient is being recorded: Triton kernels (which have no backward) and fused views may run."""
    return not torch.is_grad_enabled()


def _kernels(x: Tensor) -> bool:
    """Whether the Triton kernels take `x` (on CUDA, while inferring); `fuse` installs them only where Triton is."""
    return x.is_cuda and inferring()


class FastLayerNorm(LayerNorm):
    """LayerNorm as one Triton program per row (PyTorch's gives each row a small block: ~7 us a decode call
    against ~2 us), with the residual add, the L2 norm or the decoder's GELU in the same pass."""

    def forward(self, x: Tensor) -> Tensor:
        if _kernels(x):
            from kosmos2_cli.fast.kernels import layer_norm

            return layer_norm(x, self.weight, self.bias, self.eps)
        return super().forward(x)

    def add_norm(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        if _kernels(x):
            from kosmos2_cli.fast.kernels import add_layer_norm

            return add_layer_norm(x, h, self)
        return super().add_norm(x, h)

    def norm_l2(self, x: Tensor) -> Tensor:
        if _kernels(x):
            from kosmos2_cli.fast.kernels import layer_norm

            return layer_norm(x, self.weight, self.bias, self.eps, l2_normalize=True)
        return super().norm_l2(x)

    def act_norm(self, h: Tensor, name: str, act) -> Tensor:
        if name == "gelu" and _kernels(h):
            from kosmos2_cli.fast.kernels import gelu_layer_norm

            return gelu_layer_norm(h, self)
        return super().act_norm(h, name, act)


def fast_quick_gelu(x: Tensor) -> Tensor:
    """quick_gelu in one Triton kernel instead of three (the vision encoder's activation)."""
    if _kernels(x):
        from kosmos2_cli.fast.kernels import quick_gelu as kernel

        return kernel(x)
    return quick_gelu(x)


class FastAttention(Attention):
    """q, k and v from one (3*dim, dim) product (`fused`, whose views q/k/v_proj are); with `decode_kernel`, a
    decode step's attention over a fixed-shape cache as one Triton kernel that also writes the step's keys and
    values into it and skips the rows that are done."""

    fused: tuple[Tensor, Tensor] | None = None
    decode_kernel = False

    def project(self, x: Tensor, kv_source: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        if self.fused is not None and kv_source is None and inferring():
            return tuple(self.split(t) for t in F.linear(x, *self.fused).chunk(3, dim=-1))  # type: ignore[return-value]
        return super().project(x, kv_source)

    def takes_step(self, q: Tensor, cache: KVCache | None) -> bool:
        return (self.decode_kernel and cache is not None and cache.static and q.shape[2] == 1 and q.is_cuda
                and inferring())

    def decode_step(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache, layer: int, slots: Tensor) -> Tensor:
        from kosmos2_cli.fast.kernels import decode_attention_append

        keys, values = cache.keys[layer], cache.values[layer]
        return decode_attention_append(q.to(keys.dtype), k, v, keys, values, slots, cache.valid, cache.next_slot,
                                       self.scale, done=cache.done)

    def attend_cache(self, q: Tensor, k: Tensor, v: Tensor, mask, cache: KVCache | None, layer: int,
                     slots: Tensor | None) -> Tensor:
        if self.takes_step(q, cache):
            return self.decode_step(q, k, v, cache, layer, slots)
        return super().attend_cache(q, k, v, mask, cache, layer, slots)


class FastDecoderLayer(DecoderLayer):
    """A batch-1 decode step as four fused Triton matrix-vector kernels (each with its LayerNorm, bias,
    activation and residual), chained with programmatic dependent launch on Hopper."""

    one_row = False

    def takes_one_row(self, x: Tensor, cache: KVCache | None) -> bool:
        return (self.one_row and not self.training and x.shape[0] * x.shape[1] == 1 and cache is not None
                and cache.static and x.is_cuda and inferring())

    def forward(self, x: Tensor, mask: Tensor | None, cache: KVCache | None, layer: int, slots: Tensor | None):
        if not self.takes_one_row(x, cache):
            return super().forward(x, mask, cache, layer, slots)
        from kosmos2_cli.fast.kernels import linear_row

        attn, ffn = self.self_attn, self.ffn
        qkv = linear_row(x, *attn.fused, norm=self.self_attn_layer_norm)
        q, k, v = (attn.split(t) for t in qkv.chunk(3, dim=-1))
        out = attn.decode_step(q, k, v, cache, layer, slots).view(x.shape)
        x = linear_row(out, attn.out_proj.weight, attn.out_proj.bias, norm=attn.inner_attn_ln, residual=x)
        h = linear_row(x, ffn.fc1.weight, ffn.fc1.bias, norm=self.final_layer_norm,
                       activation=self.activation_name)
        return linear_row(h, ffn.fc2.weight, ffn.fc2.bias, norm=ffn.ffn_layernorm, residual=x)


class FastVisionEmbeddings(VisionEmbeddings):
    """On CUDA, the patch embedding as one product over the unfolded patches (`patches_as_product`)."""

    def patches(self, pixels: Tensor) -> Tensor:
        if pixels.is_cuda and inferring():
            return patches_as_product(self, pixels)
        return super().patches(pixels)


def patches_as_product(embeddings: VisionEmbeddings, pixels: Tensor) -> Tensor:
    """The strided convolution's sums as a matrix product over the unfolded patches, without cuDNN (its kernel
    took 5.4 ms for 512 images on an H100 against 1.3 ms, and its first call in a process ~0.1 s)."""
    size = embeddings.patch_size
    batch, channels = pixels.shape[:2]
    unfolded = pixels.unfold(2, size, size).unfold(3, size, size)  # batch, channels, rows, cols, size, size
    rows, cols = unfolded.shape[2:4]
    unfolded = unfolded.permute(0, 2, 3, 1, 4, 5).reshape(batch, rows * cols, channels * size * size)
    weight = embeddings.patch_embedding.weight
    return F.linear(unfolded, weight.reshape(weight.shape[0], -1))


class FastHead(nn.Linear):
    """The language-model head: one row through a Triton matrix-vector kernel (2.9 TB/s against cuBLAS's 1.7),
    larger batches through a copy padded to a multiple of 64 rows (`padded`, a buffer `fuse` registers; cuBLAS
    falls back to a slow kernel for the 65,037 rows of the vocabulary)."""

    padded: Tensor

    def forward(self, hidden: Tensor) -> Tensor:
        if hidden.is_cuda and inferring():
            if hidden.numel() == hidden.shape[-1] and self.weight.is_contiguous():
                from kosmos2_cli.fast.kernels import linear_row

                return linear_row(hidden, self.weight, None)
            if self.padded.device == hidden.device:
                return F.linear(hidden, self.padded)[..., : self.out_features]
        return super().forward(hidden)
